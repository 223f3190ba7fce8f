/*
 * 739kv.h - the kv739 C API of replikv under the name some drivers include; the declarations
 * (with their extern "C" guards for C++) are those of lib739kv.h, which must sit beside it.
 */
#ifndef REPLIKV_KV_739KV_H
#define REPLIKV_KV_739KV_H

#include "lib739kv.h"

#endif /* REPLIKV_KV_739KV_H */
