/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The provider's registration cache and its memory monitors (docs/fi_vfabric.7.md):
 *   hits     repeated registrations are served from the cache (counted through
 *            FI_VFABRIC_MR_CACHE_OPS_V1), also a range inside a cached one; remote-access
 *            regions only for the same range and get the same key.
 *   unmap    a registered (and shared, zero-copy) buffer is unmapped and a new mapping made at
 *            the same address: the default monitor invalidates the entry, and data sent from
 *            and received into the new mapping is the new mapping's, end to end.
 *   import   a consumer's struct fid_mem_monitor imported with fi_import_fid: start/stop,
 *            subscribe/unsubscribe match the cache's entries, valid is asked on hits, notify
 *            invalidates (also end to end after an unmap, which only notify reports).
 *   bounded  FI_VFABRIC_MR_CACHE_MAX_COUNT/MAX_SIZE bound the cache: LRU eviction of unused
 *            entries, in-use registrations beyond the bound are not cached.
 * No argument runs them all. Prints "mr cache: ok". "bench" measures (docs/perf.md).
 */
#include <stdbool.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>
#include <rdma/fi_ext.h>

#include "fi_vfabric.h"
#include "vf_test_rdm.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define LOCAL (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY)
#define BIG (256 << 10)

static struct fi_vfabric_mr_cache_ops_v1 *cache_ops(struct rdm *r)
{
	struct fi_vfabric_mr_cache_ops_v1 *ops = NULL;
	OK(fi_open_ops(&r->domain->fid, FI_VFABRIC_MR_CACHE_OPS_V1, 0, (void **)&ops, NULL));
	CHECK(ops && ops->size == sizeof(*ops));
	return ops;
}

static struct fi_vfabric_mr_cache_stats stats(struct rdm *r)
{
	struct fi_vfabric_mr_cache_stats s;
	OK(cache_ops(r)->stats(r->domain, &s));
	return s;
}

static void *map(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(p != MAP_FAILED);
	return p;
}

static struct fid_mr *reg(struct rdm *r, void *buf, size_t len, uint64_t access)
{
	struct fid_mr *mr = NULL;
	OK(fi_mr_reg(r->domain, buf, len, access, 0, 0, 0, &mr, NULL));
	return mr;
}

static void wait_one(struct rdm *r)
{
	struct fi_cq_entry e;
	for (long i = 0; i < 20000000; i++) {
		ssize_t n = fi_cq_read(r->cq, &e, 1);
		if (n == 1)
			return;
		if (n == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			fi_cq_readerr(r->cq, &err, 0);
			fprintf(stderr, "completion error %d (%s)\n", err.err, fi_strerror(err.err));
			exit(1);
		}
		CHECK(n == -FI_EAGAIN);
	}
	fprintf(stderr, "no completion\n");
	exit(1);
}

/* Send len bytes from src (desc sdesc) to the endpoint itself, into dst (desc ddesc). */
static void self_send(struct rdm *r, fi_addr_t me, void *src, void *sdesc, void *dst,
		      void *ddesc, size_t len)
{
	OK(fi_recv(r->ep, dst, len, ddesc, FI_ADDR_UNSPEC, NULL));
	OK(fi_send(r->ep, src, len, sdesc, me, NULL));
	wait_one(r);
	wait_one(r);
}

static void fill(void *p, size_t len, unsigned seed)
{
	unsigned char *b = p;
	for (size_t i = 0; i < len; i++)
		b[i] = (unsigned char)(seed + i * 7 + (i >> 9));
}

static bool same(const void *p, size_t len, unsigned seed)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < len; i++)
		if (b[i] != (unsigned char)(seed + i * 7 + (i >> 9)))
			return false;
	return true;
}

static void test_hits(void)
{
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA, LOCAL);
	char *buf = map(BIG);
	struct fi_vfabric_mr_cache_stats s0 = stats(&r);
	for (int i = 0; i < 10; i++)
		OK(fi_close(&reg(&r, buf, BIG, FI_SEND | FI_RECV)->fid));
	/* A range inside the cached one, while the first is still held. */
	struct fid_mr *whole = reg(&r, buf, BIG, FI_SEND | FI_RECV);
	struct fid_mr *part = reg(&r, buf + 4096, BIG / 2, FI_SEND | FI_RECV);
	struct fi_vfabric_mr_cache_stats s = stats(&r);
	CHECK(s.misses - s0.misses == 1);
	CHECK(s.hits - s0.hits == 11);
	CHECK(s.entries == 1 && s.in_use == 1 && s.bytes == BIG);
	OK(fi_close(&part->fid));
	OK(fi_close(&whole->fid));
	CHECK(stats(&r).in_use == 0);

	/* Remote access: the same range gets the same registration (and key) again; a range
	 * inside it is a registration of its own. */
	struct fid_mr *a = reg(&r, buf, BIG, FI_REMOTE_WRITE | FI_REMOTE_READ);
	uint64_t key = fi_mr_key(a);
	OK(fi_close(&a->fid));
	struct fid_mr *b = reg(&r, buf, BIG, FI_REMOTE_WRITE | FI_REMOTE_READ);
	CHECK(fi_mr_key(b) == key);
	struct fid_mr *c = reg(&r, buf, BIG / 2, FI_REMOTE_WRITE | FI_REMOTE_READ);
	CHECK(fi_mr_key(c) != key);
	s = stats(&r);
	CHECK(s.misses - s0.misses == 3 && s.hits - s0.hits == 12 && s.entries == 3);
	OK(fi_close(&b->fid));
	OK(fi_close(&c->fid));
	CHECK(cache_ops(&r)->flush(r.domain) == 3);
	CHECK(stats(&r).entries == 0);
	munmap(buf, BIG);
	fi_close(&r.domain->fid);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);
	printf("hits: ok\n");
}

/* The buffer at `at` is unmapped and mapped afresh; the new mapping is the one the data comes
 * from and goes to. `notify` (imported monitor) reports the unmap when the default monitor
 * does not watch. */
static void remap_and_check(struct rdm *r, fi_addr_t me, char *at, struct fid_mem_monitor *notify)
{
	char *other = map(BIG);
	struct fid_mr *omr = reg(r, other, BIG, FI_SEND | FI_RECV);

	fill(at, BIG, 1);
	struct fid_mr *mr = reg(r, at, BIG, FI_SEND | FI_RECV);
	self_send(r, me, at, fi_mr_desc(mr), other, fi_mr_desc(omr), BIG);
	CHECK(same(other, BIG, 1));
	OK(fi_close(&mr->fid));
	struct fi_vfabric_mr_cache_stats s0 = stats(r);

	CHECK(munmap(at, BIG) == 0);
	if (notify)
		notify->import_ops->notify(notify, at, BIG);
	char *again = mmap(at, BIG, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	CHECK(again == at);
	fill(at, BIG, 2);
	mr = reg(r, at, BIG, FI_SEND | FI_RECV);
	struct fi_vfabric_mr_cache_stats s = stats(r);
	CHECK(s.invalidations > s0.invalidations);
	CHECK(s.misses == s0.misses + 1 && s.hits == s0.hits);
	/* Sent from the new mapping... */
	memset(other, 0, BIG);
	self_send(r, me, at, fi_mr_desc(mr), other, fi_mr_desc(omr), BIG);
	CHECK(same(other, BIG, 2));
	/* ...and received into it. */
	fill(other, BIG, 3);
	memset(at, 0, BIG);
	self_send(r, me, other, fi_mr_desc(omr), at, fi_mr_desc(mr), BIG);
	CHECK(same(at, BIG, 3));
	OK(fi_close(&mr->fid));
	OK(fi_close(&omr->fid));
	munmap(other, BIG);
}

static void test_unmap(void)
{
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA, LOCAL);
	rdm_open_ep(&r);
	fi_addr_t me = rdm_self(&r);
	char *at = map(BIG);
	remap_and_check(&r, me, at, NULL);
	munmap(at, BIG);
	/* A cached region for remote access goes with its memory too (deregistered from the
	 * monitor's thread), also when freed through the allocator. */
	char *heap = malloc(4 << 20);
	CHECK(heap);
	OK(fi_close(&reg(&r, heap, 4 << 20, FI_REMOTE_READ)->fid));
	struct fi_vfabric_mr_cache_stats s = stats(&r);
	CHECK(s.entries == 1);
	free(heap); /* glibc gives a 4 MiB block back with munmap */
	CHECK(stats(&r).entries == 0 && stats(&r).invalidations == s.invalidations + 1);
	rdm_close(&r);
	printf("unmap: ok\n");
}

/* The consumer's monitor: what it was asked to watch. */
struct mon {
	struct fid_mem_monitor m;
	int starts, stops, valids;
	const void *invalid; /* valid() answers false for this address */
	size_t n;
	struct {
		const void *addr;
		size_t len;
	} subs[64];
};

static struct mon *mon_of(struct fid_mem_monitor *m)
{
	return (struct mon *)m;
}

static int mon_start(struct fid_mem_monitor *m)
{
	mon_of(m)->starts++;
	return 0;
}

static void mon_stop(struct fid_mem_monitor *m)
{
	mon_of(m)->stops++;
}

static int mon_subscribe(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	struct mon *x = mon_of(m);
	CHECK(x->n < 64);
	x->subs[x->n].addr = addr;
	x->subs[x->n].len = len;
	x->n++;
	return 0;
}

static void mon_unsubscribe(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	struct mon *x = mon_of(m);
	for (size_t i = 0; i < x->n; i++) {
		if (x->subs[i].addr == addr && x->subs[i].len == len) {
			x->subs[i] = x->subs[--x->n];
			return;
		}
	}
	fprintf(stderr, "unsubscribe of %p+%zu, never subscribed\n", addr, len);
	exit(1);
}

static bool mon_valid(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	mon_of(m)->valids++;
	return addr != mon_of(m)->invalid;
}

static bool subscribed(struct mon *x, const void *addr, size_t len)
{
	for (size_t i = 0; i < x->n; i++)
		if (x->subs[i].addr == addr && x->subs[i].len == len)
			return true;
	return false;
}

static void test_import(void)
{
	struct fi_ops_mem_monitor ops = {
		.size = sizeof(ops),
		.start = mon_start,
		.stop = mon_stop,
		.subscribe = mon_subscribe,
		.unsubscribe = mon_unsubscribe,
		.valid = mon_valid,
	};
	static struct mon x;
	memset(&x, 0, sizeof(x));
	x.m.fid.fclass = FI_CLASS_MEM_MONITOR;
	x.m.export_ops = &ops;

	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA, LOCAL);
	rdm_open_ep(&r);
	fi_addr_t me = rdm_self(&r);

	ops.size = sizeof(ops) - 1;
	CHECK_RC(fi_import_fid(&r.domain->fid, &x.m.fid, 0), -FI_EINVAL);
	ops.size = sizeof(ops);
	CHECK_RC(fi_import_fid(&r.domain->fid, &x.m.fid, 1), -FI_EBADFLAGS);
	CHECK(x.starts == 0);
	OK(fi_import_fid(&r.domain->fid, &x.m.fid, 0));
	CHECK(x.starts == 1 && x.m.import_ops && x.m.import_ops->notify);
	CHECK_RC(fi_import_fid(&r.domain->fid, &x.m.fid, 0), -FI_EBUSY);

	char *b[4];
	for (int i = 0; i < 4; i++) {
		b[i] = map(BIG);
		OK(fi_close(&reg(&r, b[i], BIG, FI_SEND | FI_RECV)->fid));
		CHECK(subscribed(&x, b[i], BIG));
	}
	struct fid_mr *rm = reg(&r, b[1], BIG, FI_REMOTE_WRITE);
	struct fi_vfabric_mr_cache_stats s = stats(&r);
	CHECK(x.n == 5 && s.entries == 5);

	/* A hit asks valid() and subscribes nothing new. */
	int valids = x.valids;
	OK(fi_close(&reg(&r, b[0], BIG, FI_SEND | FI_RECV)->fid));
	CHECK(x.valids == valids + 1 && x.n == 5);
	CHECK(stats(&r).hits == s.hits + 1);

	/* notify() invalidates: b[0]'s entry is unsubscribed; registering it again is a miss. */
	x.m.import_ops->notify(&x.m, b[0], BIG);
	s = stats(&r);
	CHECK(s.entries == 4 && x.n == 4 && !subscribed(&x, b[0], BIG));
	OK(fi_close(&reg(&r, b[0], BIG, FI_SEND | FI_RECV)->fid));
	CHECK(stats(&r).misses == s.misses + 1 && subscribed(&x, b[0], BIG) && x.n == 5);

	/* valid() false: the entry is dropped and registered afresh. */
	x.invalid = b[2];
	s = stats(&r);
	OK(fi_close(&reg(&r, b[2], BIG, FI_SEND | FI_RECV)->fid));
	CHECK(stats(&r).misses == s.misses + 1 && stats(&r).hits == s.hits);
	CHECK(subscribed(&x, b[2], BIG) && x.n == 5);
	x.invalid = NULL;

	/* An entry in use when notified leaves the cache at once. */
	x.m.import_ops->notify(&x.m, b[1], BIG);
	CHECK(!subscribed(&x, b[1], BIG) && x.n == 3 && stats(&r).entries == 3);
	OK(fi_close(&rm->fid));

	/* End to end: only notify() tells the provider that b[3] was unmapped. */
	remap_and_check(&r, me, b[3], &x.m);
	CHECK(x.n == stats(&r).entries);

	fi_close(&r.ep->fid);
	fi_close(&r.cq->fid);
	fi_close(&r.av->fid);
	OK(fi_close(&r.domain->fid));
	CHECK(x.n == 0 && x.stops == 1);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);
	for (int i = 0; i < 4; i++)
		munmap(b[i], BIG);
	printf("import: ok\n");
}

static void test_bounded(void)
{
	enum { N = 8, SZ = 128 << 10 };
	char *b[N];
	for (int i = 0; i < N; i++)
		b[i] = map(SZ);

	/* At most 3 entries. */
	setenv("FI_VFABRIC_MR_CACHE_MAX_COUNT", "3", 1);
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG, LOCAL);
	CHECK(stats(&r).max_count == 3);
	for (int i = 0; i < N; i++) {
		OK(fi_close(&reg(&r, b[i], SZ, FI_SEND | FI_RECV)->fid));
		CHECK(stats(&r).entries <= 3);
	}
	struct fi_vfabric_mr_cache_stats s = stats(&r);
	CHECK(s.entries == 3 && s.evictions == N - 3 && s.misses == N);
	/* Least recently used went first: b[N-1] is still there, b[0] is not. */
	OK(fi_close(&reg(&r, b[N - 1], SZ, FI_SEND | FI_RECV)->fid));
	CHECK(stats(&r).hits == s.hits + 1);
	OK(fi_close(&reg(&r, b[0], SZ, FI_SEND | FI_RECV)->fid));
	CHECK(stats(&r).misses == s.misses + 1);
	/* Entries in use are never evicted: a fourth registration held open is not cached. */
	cache_ops(&r)->flush(r.domain);
	struct fid_mr *held[4];
	for (int i = 0; i < 4; i++)
		held[i] = reg(&r, b[i], SZ, FI_SEND | FI_RECV);
	s = stats(&r);
	CHECK(s.entries == 3 && s.in_use == 3 && s.uncached >= 1);
	for (int i = 0; i < 4; i++)
		OK(fi_close(&held[i]->fid));
	fi_close(&r.domain->fid);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);

	/* At most 2 * SZ bytes. */
	setenv("FI_VFABRIC_MR_CACHE_MAX_COUNT", "100", 1);
	setenv("FI_VFABRIC_MR_CACHE_MAX_SIZE", "262144", 1);
	rdm_open_domain_with(&r, FI_MSG, LOCAL);
	CHECK(stats(&r).max_size == 2 * SZ);
	for (int i = 0; i < N; i++) {
		OK(fi_close(&reg(&r, b[i], SZ, FI_SEND | FI_RECV)->fid));
		CHECK(stats(&r).bytes <= 2 * SZ);
	}
	s = stats(&r);
	CHECK(s.entries == 2 && s.evictions == N - 2);
	fi_close(&r.domain->fid);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);

	/* 0 turns the cache off. */
	setenv("FI_VFABRIC_MR_CACHE_MAX_COUNT", "0", 1);
	unsetenv("FI_VFABRIC_MR_CACHE_MAX_SIZE");
	rdm_open_domain_with(&r, FI_MSG, LOCAL);
	for (int i = 0; i < 3; i++)
		OK(fi_close(&reg(&r, b[0], SZ, FI_SEND | FI_RECV)->fid));
	s = stats(&r);
	CHECK(s.entries == 0 && s.hits == 0 && s.uncached == 3);
	fi_close(&r.domain->fid);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);
	unsetenv("FI_VFABRIC_MR_CACHE_MAX_COUNT");
	for (int i = 0; i < N; i++)
		munmap(b[i], SZ);
	printf("bounded: ok\n");
}

static int cmp_ns(const void *a, const void *b)
{
	long x = *(const long *)a, y = *(const long *)b;
	return (x > y) - (x < y);
}

/* Not a test: median cost of fi_mr_reg + fi_close of the same 1 MiB buffer, local (shared with
 * the device) and for remote access (docs/perf.md runs it with the cache on and off). */
static void bench(void)
{
	enum { ROUNDS = 201, LEN = 1 << 20 };
	static long ns[ROUNDS];
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA, LOCAL);
	char *buf = map(LEN);
	memset(buf, 1, LEN);
	const uint64_t acc[2] = { FI_SEND | FI_RECV, FI_REMOTE_READ | FI_REMOTE_WRITE };
	for (int k = 0; k < 2; k++) {
		for (int i = 0; i < ROUNDS; i++) {
			struct timespec a, b;
			clock_gettime(CLOCK_MONOTONIC, &a);
			OK(fi_close(&reg(&r, buf, LEN, acc[k])->fid));
			clock_gettime(CLOCK_MONOTONIC, &b);
			ns[i] = (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
		}
		qsort(ns, ROUNDS, sizeof(ns[0]), cmp_ns);
		printf("bench %s: median %.2f us\n", k ? "remote" : "local", ns[ROUNDS / 2] / 1000.0);
	}
	munmap(buf, LEN);
	fi_close(&r.domain->fid);
	fi_close(&r.fabric->fid);
	fi_freeinfo(r.info);
}

int main(int argc, char **argv)
{
	const char *which = argc > 1 ? argv[1] : "";
	if (!strcmp(which, "bench")) {
		bench();
		return 0;
	}
	bool all = !*which;
	if (all || !strcmp(which, "hits"))
		test_hits();
	if (all || !strcmp(which, "unmap"))
		test_unmap();
	if (all || !strcmp(which, "import"))
		test_import();
	if (all || !strcmp(which, "bounded"))
		test_bounded();
	printf("mr cache: ok\n");
	return 0;
}
