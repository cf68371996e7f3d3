// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
// What a rendezvous read costs the target daemon besides the bytes' own transfer
// (docs/design.md, "Zero-copy at the target"; figures in docs/perf.md):
//   bounce: a zeroed daemon buffer, the copy into guest memory, the free (the path before);
//   mapped: a mapping of its own of the guest pages (mmap MAP_SHARED|MAP_POPULATE), unmapped;
//   reused: an idle mapping of the same bytes taken again (an fstat for its key).
// Guest memory is a 64 MiB memfd, mapped shared as a vhost-user backend maps it.
//   cc -O2 -o /tmp/bench-shadow-map scripts/bench-shadow-map.c && /tmp/bench-shadow-map 1048576
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { N = 300 };

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *what, size_t len, double *v)
{
	qsort(v, N, sizeof v[0], cmp);
	printf("%zu B %-7s min %8.2f µs  median %8.2f µs\n", len, what, v[0], v[N / 2]);
}

int main(int argc, char **argv)
{
	size_t len = argc > 1 ? strtoul(argv[1], NULL, 0) : 1 << 20;
	size_t region = 64 << 20;
	if (len == 0 || len > region / 2)
		return fprintf(stderr, "length 1..%zu\n", region / 2), 2;
	int fd = memfd_create("guest", 0);
	if (fd < 0 || ftruncate(fd, region) != 0)
		return perror("memfd"), 1;
	char *guest = mmap(NULL, region, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (guest == MAP_FAILED)
		return perror("mmap"), 1;
	memset(guest, 1, region);
	static double bounce[N], mapped[N], reused[N];
	long page = sysconf(_SC_PAGESIZE);
	for (int i = 0; i < N; i++) {
		size_t off = ((size_t)i * len) % (region - len) / page * page;
		double t = now_us();
		char *buf = calloc(1, len);
		buf[len - 1] = (char)i; // the read lands here
		memcpy(guest + off, buf, len);
		free(buf);
		bounce[i] = now_us() - t;
		t = now_us();
		char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off);
		if (m == MAP_FAILED)
			return perror("mmap"), 1;
		m[len - 1] = (char)i;
		munmap(m, len);
		mapped[i] = now_us() - t;
	}
	char *keep = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (keep == MAP_FAILED)
		return perror("mmap"), 1;
	for (int i = 0; i < N; i++) {
		struct stat st;
		double t = now_us();
		fstat(fd, &st);
		keep[len - 1] = (char)i;
		reused[i] = now_us() - t;
	}
	report("bounce", len, bounce);
	report("mapped", len, mapped);
	report("reused", len, reused);
	return 0;
}
