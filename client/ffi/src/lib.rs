//! kv739 C API.
