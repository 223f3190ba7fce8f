"""Loads the kv739 library through ctypes with the signatures of lib739kv.h; shared by the
Python test drivers in this folder."""

import ctypes


def load(path):
    lib = ctypes.CDLL(path)
    lib.kv739_init.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
    lib.kv739_init.restype = ctypes.c_int
    lib.kv739_shutdown.argtypes = []
    lib.kv739_shutdown.restype = ctypes.c_int
    lib.kv739_get.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.kv739_get.restype = ctypes.c_int
    lib.kv739_put.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.kv739_put.restype = ctypes.c_int
    return lib
