/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * HMEM copy overrides (issue 13 §1): device memory the provider must never touch itself.
 *
 * The "device memory" is an anonymous mapping with PROT_NONE; only this test's copy functions
 * (installed with fi_set_ops(FI_SET_OPS_HMEM_OVERRIDE)) open it, briefly, and count their
 * calls. Any direct access by the provider or the driver crashes the test (SIGSEGV), and a copy
 * the provider skipped shows as wrong data or a wrong count. Checked paths: fi_send, fi_sendmsg
 * (a host and a device buffer in one message), fi_inject (no descriptor: found by its
 * registered range), fi_recv, fi_trecv, fi_tsend, fi_write, fi_read, fi_atomic (operand),
 * fi_fetch_atomic (result), fi_compare_atomic (compare and result). Also: fi_getinfo offers
 * FI_HMEM with FI_MR_HMEM only when asked; registration of a device iface fails -FI_ENOSYS
 * before the overrides are installed; fi_set_ops checks name, flags, size and functions.
 * Prints "hmem: ok".
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <rdma/fabric.h>
#include <rdma/fi_atomic.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_ext.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_tagged.h>

#include "vf_test_rdm.h"

#define DEV_LEN (64 * 1024)
#define DEV_ID 3

static char *dev;
static int from_calls, to_calls;

static void dev_open(int prot)
{
	CHECK(mprotect(dev, DEV_LEN, prot) == 0);
}

/* The test's own access to its device memory (to fill and check it). */
static void dev_put(size_t off, const void *src, size_t n)
{
	dev_open(PROT_READ | PROT_WRITE);
	memcpy(dev + off, src, n);
	dev_open(PROT_NONE);
}

static void dev_get(size_t off, void *dst, size_t n)
{
	dev_open(PROT_READ);
	memcpy(dst, dev + off, n);
	dev_open(PROT_NONE);
}

static int in_dev(const struct iovec *v)
{
	char *p = v->iov_base;
	return p >= dev && p + v->iov_len <= dev + DEV_LEN;
}

/* Copy `size` bytes between `host` and device iovecs from `offset`, the device side opened
 * for the copy only; one more call counted in `calls`. */
static ssize_t copy_iov(enum fi_hmem_iface iface, uint64_t device, const struct iovec *iov,
			size_t count, uint64_t offset, char *host, size_t size, int to_dev,
			int *calls)
{
	CHECK(iface == FI_HMEM_CUDA && device == DEV_ID);
	size_t done = 0;
	dev_open(to_dev ? PROT_READ | PROT_WRITE : PROT_READ);
	for (size_t k = 0; k < count && done < size; k++) {
		CHECK(in_dev(&iov[k]));
		size_t skip = offset < iov[k].iov_len ? offset : iov[k].iov_len;
		offset -= skip;
		size_t n = iov[k].iov_len - skip;
		if (n > size - done)
			n = size - done;
		char *d = (char *)iov[k].iov_base + skip;
		if (to_dev)
			memcpy(d, host + done, n);
		else
			memcpy(host + done, d, n);
		done += n;
	}
	dev_open(PROT_NONE);
	(*calls)++;
	return (ssize_t)done;
}

static ssize_t copy_from(void *dest, size_t size, enum fi_hmem_iface iface, uint64_t device,
			 const struct iovec *iov, size_t count, uint64_t offset)
{
	return copy_iov(iface, device, iov, count, offset, dest, size, 0, &from_calls);
}

static ssize_t copy_to(enum fi_hmem_iface iface, uint64_t device, const struct iovec *iov,
		       size_t count, uint64_t offset, const void *src, size_t size)
{
	return copy_iov(iface, device, iov, count, offset, (char *)src, size, 1, &to_calls);
}

static struct rdm r;

/* The completion of `ctx` (bounded wait); its entry's len. */
static size_t wait_for(void *ctx)
{
	struct fi_cq_msg_entry e;
	time_t end = time(NULL) + 20;
	for (;;) {
		ssize_t n = fi_cq_read(r.cq, &e, 1);
		if (n == 1) {
			CHECK(e.op_context == ctx);
			return e.len;
		}
		if (n == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			CHECK(fi_cq_readerr(r.cq, &err, 0) == 1);
			fprintf(stderr, "error completion: %s\n", fi_strerror(err.err));
			exit(1);
		}
		CHECK_RC(n, -FI_EAGAIN);
		CHECK(time(NULL) < end);
	}
}

/* A completed send and its receive, in either order. */
static void wait_two(void *a, void *b)
{
	struct fi_cq_msg_entry e;
	int seen = 0;
	time_t end = time(NULL) + 20;
	while (seen != 3) {
		ssize_t n = fi_cq_read(r.cq, &e, 1);
		if (n == 1) {
			CHECK(e.op_context == a || e.op_context == b);
			seen |= e.op_context == a ? 1 : 2;
			continue;
		}
		CHECK_RC(n, -FI_EAGAIN);
		CHECK(time(NULL) < end);
	}
}

static void fill(char *p, size_t n, int seed)
{
	for (size_t k = 0; k < n; k++)
		p[k] = (char)(seed + k * 7);
}

static struct fi_info *hmem_info(uint64_t caps, int mr_mode)
{
	struct fi_info *hints = fi_allocinfo(), *info = NULL;
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = caps;
	hints->domain_attr->mr_mode = mr_mode;
	hints->fabric_attr->prov_name = strdup("vfabric");
	int rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &info);
	fi_freeinfo(hints);
	return rc == 0 ? info : NULL;
}

/* The endpoint with an FI_CQ_FORMAT_MSG CQ (entries carry len). */
static void open_ep(void)
{
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(r.domain, &av_attr, &r.av, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .size = 16 };
	OK(fi_cq_open(r.domain, &cq_attr, &r.cq, NULL));
	OK(fi_endpoint(r.domain, r.info, &r.ep, NULL));
	OK(fi_ep_bind(r.ep, &r.av->fid, 0));
	OK(fi_ep_bind(r.ep, &r.cq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(r.ep));
}

static struct fid_mr *reg_dev(size_t off, size_t len, uint64_t access, int want)
{
	struct iovec v = { dev + off, len };
	struct fi_mr_attr a = { .mr_iov = &v, .iov_count = 1, .access = access,
				.iface = FI_HMEM_CUDA };
	a.device.cuda = DEV_ID;
	struct fid_mr *mr = NULL;
	CHECK_RC(fi_mr_regattr(r.domain, &a, 0, &mr), want);
	return mr;
}

int main(void)
{
	const int mode = FI_MR_HMEM | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY;
	const uint64_t caps = FI_MSG | FI_TAGGED | FI_RMA | FI_ATOMIC | FI_HMEM;
	dev = mmap(NULL, DEV_LEN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(dev != MAP_FAILED);

	/* fi_getinfo: FI_HMEM only when asked, and only with FI_MR_HMEM. */
	struct fi_info *i = hmem_info(FI_MSG, 0);
	CHECK(i && !(i->caps & FI_HMEM) && !(i->domain_attr->mr_mode & FI_MR_HMEM));
	fi_freeinfo(i);
	CHECK(hmem_info(FI_MSG | FI_HMEM, FI_MR_VIRT_ADDR) == NULL);
	i = hmem_info(caps, mode);
	CHECK(i && (i->caps & FI_HMEM) && (i->domain_attr->mr_mode & FI_MR_HMEM));
	fi_freeinfo(i);

	rdm_open_domain_with(&r, caps, mode);
	/* Without overrides a device iface cannot be registered (no device runtime). */
	reg_dev(0, 4096, FI_SEND, -FI_ENOSYS);
	struct fi_hmem_override_ops ops = { sizeof(ops), copy_from, copy_to };
	struct fi_hmem_override_ops half = { sizeof(ops), copy_from, NULL };
	struct fi_hmem_override_ops small = { sizeof(size_t), copy_from, copy_to };
	CHECK_RC(fi_set_ops(&r.domain->fid, "no_such_ops", 0, &ops, NULL), -FI_ENOSYS);
	CHECK_RC(fi_set_ops(&r.domain->fid, FI_SET_OPS_HMEM_OVERRIDE, 1, &ops, NULL), -FI_EBADFLAGS);
	CHECK_RC(fi_set_ops(&r.domain->fid, FI_SET_OPS_HMEM_OVERRIDE, 0, &half, NULL), -FI_EINVAL);
	CHECK_RC(fi_set_ops(&r.domain->fid, FI_SET_OPS_HMEM_OVERRIDE, 0, &small, NULL), -FI_EINVAL);
	reg_dev(0, 4096, FI_SEND, -FI_ENOSYS);
	OK(fi_set_ops(&r.domain->fid, FI_SET_OPS_HMEM_OVERRIDE, 0, &ops, NULL));
	/* Peers cannot reach device memory: local access only. */
	reg_dev(0, 4096, FI_REMOTE_WRITE, -FI_EINVAL);
	struct fid_mr *dmr = reg_dev(0, DEV_LEN, FI_SEND | FI_RECV | FI_READ | FI_WRITE, 0);
	void *dd = fi_mr_desc(dmr);
	open_ep();
	fi_addr_t me = rdm_self(&r);
	CHECK(from_calls == 0 && to_calls == 0);

	char host[4096], want[4096];
	/* fi_send from device memory into a host receive. */
	fill(want, 1000, 1);
	dev_put(0, want, 1000);
	memset(host, 0, sizeof(host));
	OK(fi_recv(r.ep, host, sizeof(host), NULL, FI_ADDR_UNSPEC, (void *)1));
	OK(fi_send(r.ep, dev, 1000, dd, me, (void *)2));
	wait_two((void *)1, (void *)2);
	CHECK(memcmp(host, want, 1000) == 0);
	CHECK(from_calls == 1 && to_calls == 0);

	/* fi_recv into device memory from a host send. */
	fill(want, 3000, 2);
	OK(fi_recv(r.ep, dev + 8192, 4096, dd, FI_ADDR_UNSPEC, (void *)3));
	OK(fi_send(r.ep, want, 3000, NULL, me, (void *)4));
	wait_two((void *)3, (void *)4);
	CHECK(to_calls == 1);
	dev_get(8192, host, 3000);
	CHECK(memcmp(host, want, 3000) == 0);

	/* fi_inject from device memory (no descriptor: its registered range names it). */
	fill(want, 64, 3);
	dev_put(100, want, 64);
	memset(host, 0, 64);
	OK(fi_recv(r.ep, host, 64, NULL, FI_ADDR_UNSPEC, (void *)5));
	OK(fi_inject(r.ep, dev + 100, 64, me));
	CHECK(wait_for((void *)5) == 64);
	CHECK(memcmp(host, want, 64) == 0);
	CHECK(from_calls == 2);

	/* Tagged, device to device. */
	fill(want, 2000, 4);
	dev_put(16384, want, 2000);
	OK(fi_trecv(r.ep, dev + 20480, 2000, dd, FI_ADDR_UNSPEC, 0x77, 0, (void *)6));
	OK(fi_tsend(r.ep, dev + 16384, 2000, dd, me, 0x77, (void *)7));
	wait_two((void *)6, (void *)7);
	CHECK(from_calls == 3 && to_calls == 2);
	dev_get(20480, host, 2000);
	CHECK(memcmp(host, want, 2000) == 0);

	/* fi_sendmsg gathering a host and a device buffer. */
	char head[16];
	fill(head, 16, 5);
	fill(want, 500, 6);
	dev_put(24576, want, 500);
	struct iovec sv[2] = { { head, 16 }, { dev + 24576, 500 } };
	void *sd[2] = { NULL, dd };
	struct fi_msg sm = { .msg_iov = sv, .desc = sd, .iov_count = 2, .addr = me,
			     .context = (void *)9 };
	memset(host, 0, 516);
	OK(fi_recv(r.ep, host, 516, NULL, FI_ADDR_UNSPEC, (void *)8));
	OK(fi_sendmsg(r.ep, &sm, FI_COMPLETION));
	wait_two((void *)8, (void *)9);
	CHECK(memcmp(host, head, 16) == 0 && memcmp(host + 16, want, 500) == 0);
	CHECK(from_calls == 4 && to_calls == 2);

	/* RMA: the target is host memory (remote access); local buffers are device memory. */
	static uint64_t tgt[512];
	struct fid_mr *tmr;
	OK(fi_mr_reg(r.domain, tgt, sizeof(tgt), FI_REMOTE_READ | FI_REMOTE_WRITE, 0, 0, 0, &tmr,
		     NULL));
	uint64_t key = fi_mr_key(tmr), base = (uint64_t)(uintptr_t)tgt;
	fill(want, 256, 7);
	dev_put(28672, want, 256);
	OK(fi_write(r.ep, dev + 28672, 256, dd, me, base, key, (void *)10));
	wait_for((void *)10);
	CHECK(memcmp(tgt, want, 256) == 0);
	CHECK(from_calls == 5 && to_calls == 2);
	fill((char *)tgt + 1024, 512, 8);
	OK(fi_read(r.ep, dev + 32768, 512, dd, me, base + 1024, key, (void *)11));
	wait_for((void *)11);
	CHECK(to_calls == 3);
	dev_get(32768, host, 512);
	CHECK(memcmp(host, (char *)tgt + 1024, 512) == 0);

	/* Atomics: operand, result, compare value and result in device memory. */
	tgt[0] = 40;
	uint64_t v = 2, got = 0;
	dev_put(36864, &v, 8);
	OK(fi_atomic(r.ep, dev + 36864, 1, dd, me, base, key, FI_UINT64, FI_SUM, (void *)12));
	wait_for((void *)12);
	CHECK(tgt[0] == 42 && from_calls == 6);
	v = 8;
	OK(fi_fetch_atomic(r.ep, &v, 1, NULL, dev + 36872, dd, me, base, key, FI_UINT64, FI_SUM,
			   (void *)13));
	wait_for((void *)13);
	CHECK(tgt[0] == 50 && to_calls == 4);
	dev_get(36872, &got, 8);
	CHECK(got == 42);
	uint64_t cmp = 50;
	v = 7;
	dev_put(36880, &cmp, 8);
	OK(fi_compare_atomic(r.ep, &v, 1, NULL, dev + 36880, dd, dev + 36888, dd, me, base, key,
			     FI_UINT64, FI_CSWAP, (void *)14));
	wait_for((void *)14);
	CHECK(tgt[0] == 7 && from_calls == 7 && to_calls == 5);
	dev_get(36888, &got, 8);
	CHECK(got == 50);

	/* A posted receive into device memory, cancelled: its context comes back. */
	OK(fi_recv(r.ep, dev + 40960, 64, dd, FI_ADDR_UNSPEC, (void *)15));
	OK(fi_cancel(&r.ep->fid, (void *)15));
	struct fi_cq_err_entry err = { 0 };
	struct fi_cq_msg_entry e;
	time_t end = time(NULL) + 20;
	ssize_t n;
	while ((n = fi_cq_read(r.cq, &e, 1)) == -FI_EAGAIN)
		CHECK(time(NULL) < end);
	CHECK_RC(n, -FI_EAVAIL);
	CHECK(fi_cq_readerr(r.cq, &err, 0) == 1);
	CHECK(err.op_context == (void *)15 && err.err == FI_ECANCELED);
	CHECK(from_calls == 7 && to_calls == 5);

	OK(fi_close(&tmr->fid));
	OK(fi_close(&dmr->fid));
	rdm_close(&r);
	munmap(dev, DEV_LEN);
	printf("hmem: ok (%d copies from, %d to device memory)\n", from_calls, to_calls);
	return 0;
}
