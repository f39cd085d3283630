# code_stamp ROOT [EXTRA_FILE...]: a short hash of the code a long-running server loaded at start
# (the compliance package, policies, audit schemas and templates, pyproject.toml, deploy/orthanc),
# plus any extra files (settings). `up` and `deploy/local/gateway start` restart a server that is
# already running when its stamp changed, so after a `git pull` the demo never keeps serving old code.
code_stamp() {
  local root=$1; shift
  (
    cd "$root" || exit 1
    find compliance policies audit deploy/orthanc -type f \
      \( -name '*.py' -o -name '*.yaml' -o -name '*.json' -o -name '*.xsd' -o -name '*.c' \) -print0 \
      | sort -z | xargs -0 sha256sum
    sha256sum pyproject.toml
    for f in "$@"; do [ -f "$f" ] && sha256sum "$f"; done
  ) 2>/dev/null | sha256sum | cut -c1-16
}
