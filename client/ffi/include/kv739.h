/*
 * kv739.h - the kv739 C API of replikv under the name some drivers include; the declarations
 * (with their extern "C" guards for C++) are those of lib739kv.h, which must sit beside it.
 */
#ifndef REPLIKV_KV739_H
#define REPLIKV_KV739_H

#include "lib739kv.h"

#endif /* REPLIKV_KV739_H */
