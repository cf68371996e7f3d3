/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The check macros of the C tests and benchmarks of the vfabric provider. A failed check prints
 * where it failed (prefixed by VF_WHO, a `const char *` expression a file may define first, e.g.
 * which of two processes failed) and exits 1.
 */
#ifndef VF_CHECK_H
#define VF_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <rdma/fi_errno.h>

#ifndef VF_WHO
#define VF_WHO ""
#endif

#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "%s%s%s:%d: check failed: %s\n", VF_WHO,            \
				*(VF_WHO) ? ": " : "", __FILE__, __LINE__, #cond);         \
			exit(1);                                                           \
		}                                                                          \
	} while (0)
#define CHECK_RC(expr, want)                                                               \
	do {                                                                               \
		long _r = (long)(expr);                                                    \
		if (_r != (long)(want)) {                                                  \
			fprintf(stderr, "%s%s%s:%d: %s = %ld (%s), want %ld\n", VF_WHO,     \
				*(VF_WHO) ? ": " : "", __FILE__, __LINE__, #expr, _r,      \
				fi_strerror((int)-_r), (long)(want));                      \
			exit(1);                                                           \
		}                                                                          \
	} while (0)
#define OK(expr) CHECK_RC(expr, 0)

#endif
