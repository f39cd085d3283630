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
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static OrthancPluginContext* ctx_ = NULL;

/* ACTIVE_STORAGE.<method>(args built from format): a new reference, or NULL with the reason logged.
 * The caller holds the GIL. NULL refuses the operation (never a fallback). */
static PyObject* module_name_ = NULL;

static PyObject* call_storage(const char* method, const char* format, ...) {
  if (module_name_ == NULL) module_name_ = PyUnicode_InternFromString("compliance.archive.storage");
  /* Only the module the Python plugin imported at start-up: importing it here, on one of Orthanc's
   * request threads, crashed Orthanc (tests/integration/test_storage_shim_fail_closed.py). */
  PyObject* module = module_name_ ? PyImport_GetModule(module_name_) : NULL;
  PyObject* storage = module ? PyObject_GetAttrString(module, "ACTIVE_STORAGE") : NULL;
  Py_XDECREF(module);
  PyObject* result = NULL;
  if (storage == NULL || storage == Py_None) {
    if (PyErr_Occurred()) PyErr_Print();
    OrthancPluginLogError(ctx_, "compliance storage shim: no storage object (is the Python plugin loaded?)");
  } else {
    va_list va;
    va_start(va, format);
    PyObject* args = Py_VaBuildValue(format, va);
    va_end(va);
    PyObject* callable = args ? PyObject_GetAttrString(storage, method) : NULL;
    if (callable) result = PyObject_CallObject(callable, args);
    Py_XDECREF(callable);
    Py_XDECREF(args);
  }
  Py_XDECREF(storage);
  if (result == NULL && PyErr_Occurred()) PyErr_Print();
  return result;
}

/* Copy the bytes a read returned into Orthanc's buffer: allocated here (whole file) or given (range). */
static OrthancPluginErrorCode copy_out(OrthancPluginMemoryBuffer64* target, PyObject* r, int allocate) {
  char* buf; Py_ssize_t len;
  if (PyBytes_AsStringAndSize(r, &buf, &len) != 0) {
    PyErr_Print();
    return OrthancPluginErrorCode_Plugin;
  }
  if (allocate) {
    if (OrthancPluginCreateMemoryBuffer64(ctx_, target, (uint64_t) len) != OrthancPluginErrorCode_Success) return OrthancPluginErrorCode_NotEnoughMemory;
  } else if ((uint64_t) len != target->size) {
    return OrthancPluginErrorCode_BadRange;
  }
  if (len) memcpy(target->data, buf, (size_t) len);
  return OrthancPluginErrorCode_Success;
}

static OrthancPluginErrorCode Create(const char* uuid, const void* content, int64_t size, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = call_storage("create", "(siy#)", uuid, (int) type, (const char*) content, (Py_ssize_t) size);
  OrthancPluginErrorCode rc = r ? OrthancPluginErrorCode_Success : OrthancPluginErrorCode_Plugin;
  Py_XDECREF(r);
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode ReadWhole(OrthancPluginMemoryBuffer64* target, const char* uuid, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = call_storage("read", "(si)", uuid, (int) type);
  OrthancPluginErrorCode rc = r ? copy_out(target, r, 1) : OrthancPluginErrorCode_Plugin;
  Py_XDECREF(r);
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode ReadRange(OrthancPluginMemoryBuffer64* target, const char* uuid, OrthancPluginContentType type, uint64_t start) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = call_storage("read_range", "(siKK)", uuid, (int) type, (unsigned long long) start,
                             (unsigned long long) target->size);
  OrthancPluginErrorCode rc = r ? copy_out(target, r, 0) : OrthancPluginErrorCode_Plugin;
  Py_XDECREF(r);
  PyGILState_Release(g);
  return rc;
}

static OrthancPluginErrorCode Remove(const char* uuid, OrthancPluginContentType type) {
  if (!Py_IsInitialized()) return OrthancPluginErrorCode_Plugin;
  PyGILState_STATE g = PyGILState_Ensure();
  PyObject* r = call_storage("remove", "(si)", uuid, (int) type);
  OrthancPluginErrorCode rc = r ? OrthancPluginErrorCode_Success : OrthancPluginErrorCode_Plugin;
  Py_XDECREF(r);
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
