/*
 * compliance storage shim: Orthanc's storage area *with range reads*, served by the project's
 * Python storage (compliance/archive/storage.py, EncryptedFilesystemStorage) inside the same process.
 *
 * Why: orthanc-python 4.0 only offers OrthancPluginRegisterStorageArea (whole-file callbacks), and a
 * storage area without range reads makes Orthanc store and sync a second file per instance
 * ("dicom-until-pixel-data"). This shim registers OrthancPluginRegisterStorageArea2 and calls the
 * Python storage object that compliance/archive/orthanc_plugin.py publishes as
 * compliance.archive.storage.ACTIVE_STORAGE (create, read, read_range, remove), under the GIL.
 *
 * Fail closed. It is listed *before* libOrthancPython.so in "Plugins": at its initialisation it
 * registers the storage area and sets COMPLIANCE_STORAGE_SHIM=registered in the environment, which
 * the Python plugin reads when it starts right after: only then does the Python plugin leave the
 * storage area to the shim; without the shim (not built, not loadable: Orthanc skips a plugin it
 * cannot load) it registers its own whole-file storage area, encrypted all the same. Every callback
 * fails (the write or read is refused) when the interpreter or the storage object is missing.
 *
 * Built by deploy/local/up (gcc, Debian orthanc-dev and python3.11-dev) into $STACK/orthanc/.
 * No key material and no plaintext is handled here beyond passing buffers to and from Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <orthanc/OrthancCPlugin.h>
#include <stdlib.h>
#include <string.h>

static OrthancPluginContext* ctx_ = NULL;

static PyObject* storage(void) {  /* new reference or NULL (GIL held); NULL: refuse the operation */
  PyObject* mod = PyImport_ImportModule("compliance.archive.storage");
  if (!mod) return NULL;
  PyObject* s = PyObject_GetAttrString(mod, "ACTIVE_STORAGE");
  Py_DECREF(mod);
  if (s == Py_None) { Py_DECREF(s); return NULL; }
  return s;
}

static OrthancPluginErrorCode fail(void) {
  if (PyErr_Occurred()) PyErr_Print();
  return OrthancPluginErrorCode_Plugin;
}

static OrthancPluginErrorCode Create(const char* uuid, const void* content, int64_t size, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  OrthancPluginErrorCode rc = OrthancPluginErrorCode_Success;
  PyObject* s = storage();
  if (!s) {
    if (!PyErr_Occurred()) OrthancPluginLogError(ctx_, "compliance storage shim: no storage object (is the Python plugin loaded?)");
    rc = fail(); goto out;
  }
  PyObject* r = PyObject_CallMethod(s, "create", "siy#", uuid, (int) type, (const char*) content, (Py_ssize_t) size);
  Py_DECREF(s);
  if (!r) { rc = fail(); goto out; }
  Py_DECREF(r);
out:
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode copy_out(OrthancPluginMemoryBuffer64* target, PyObject* r, int allocate) {
  char* buf; Py_ssize_t len;
  if (PyBytes_AsStringAndSize(r, &buf, &len) != 0) return fail();
  if (allocate) {
    if (OrthancPluginCreateMemoryBuffer64(ctx_, target, (uint64_t) len) != OrthancPluginErrorCode_Success) return OrthancPluginErrorCode_NotEnoughMemory;
  } else if ((uint64_t) len != target->size) {
    return OrthancPluginErrorCode_BadRange;
  }
  if (len) memcpy(target->data, buf, (size_t) len);
  return OrthancPluginErrorCode_Success;
}

static OrthancPluginErrorCode ReadWhole(OrthancPluginMemoryBuffer64* target, const char* uuid, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  OrthancPluginErrorCode rc;
  PyObject* s = storage();
  if (!s) {
    if (!PyErr_Occurred()) OrthancPluginLogError(ctx_, "compliance storage shim: no storage object (is the Python plugin loaded?)");
    rc = fail(); goto out;
  }
  PyObject* r = PyObject_CallMethod(s, "read", "si", uuid, (int) type);
  Py_DECREF(s);
  if (!r) { rc = fail(); goto out; }
  rc = copy_out(target, r, 1);
  Py_DECREF(r);
out:
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode ReadRange(OrthancPluginMemoryBuffer64* target, const char* uuid, OrthancPluginContentType type, uint64_t start) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  OrthancPluginErrorCode rc;
  PyObject* s = storage();
  if (!s) {
    if (!PyErr_Occurred()) OrthancPluginLogError(ctx_, "compliance storage shim: no storage object (is the Python plugin loaded?)");
    rc = fail(); goto out;
  }
  PyObject* r = PyObject_CallMethod(s, "read_range", "siKK", uuid, (int) type, (unsigned long long) start, (unsigned long long) target->size);
  Py_DECREF(s);
  if (!r) { rc = fail(); goto out; }
  rc = copy_out(target, r, 0);
  Py_DECREF(r);
out:
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode Remove(const char* uuid, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  OrthancPluginErrorCode rc = OrthancPluginErrorCode_Success;
  PyObject* s = storage();
  if (!s) {
    if (!PyErr_Occurred()) OrthancPluginLogError(ctx_, "compliance storage shim: no storage object (is the Python plugin loaded?)");
    rc = fail(); goto out;
  }
  PyObject* r = PyObject_CallMethod(s, "remove", "si", uuid, (int) type);
  Py_DECREF(s);
  if (!r) { rc = fail(); goto out; }
  Py_DECREF(r);
out:
  PyGILState_Release(g);
  return rc;
}

ORTHANC_PLUGINS_API int32_t OrthancPluginInitialize(OrthancPluginContext* c) {
  ctx_ = c;
  if (Py_IsInitialized()) {
    /* the Python plugin started first and has chosen its own storage area already */
    OrthancPluginLogError(c, "compliance storage shim: must be listed before libOrthancPython.so");
    return -1;
  }
  OrthancPluginRegisterStorageArea2(c, Create, ReadWhole, ReadRange, Remove);
  if (setenv("COMPLIANCE_STORAGE_SHIM", "registered", 1) != 0) return -1;
  OrthancPluginLogWarning(c, "compliance storage shim: storage area with range reads registered");
  return 0;
}
ORTHANC_PLUGINS_API void OrthancPluginFinalize(void) {}
ORTHANC_PLUGINS_API const char* OrthancPluginGetName(void) { return "compliance-storage-shim"; }
ORTHANC_PLUGINS_API const char* OrthancPluginGetVersion(void) { return "1.0"; }
