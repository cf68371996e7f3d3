/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Write + commit latency and commit bandwidth through any libfabric provider that offers
 * FI_RMA_PMEM (scripts/pmem-compare.sh runs it for tcp and for vfabric): one process, one
 * domain, a target and an initiator endpoint (RDM where the provider offers FI_RMA_PMEM there,
 * else FI_EP_MSG connected over 127.0.0.1, as libfabric 1.17's tcp offers it only on MSG
 * endpoints); the target registers a MAP_SHARED mapping of
 * a file with FI_RMA_PMEM, the initiator writes with FI_COMMIT_COMPLETE. The floor is a local
 * store into the same mapping followed by msync(MS_SYNC) of the range's pages.
 *
 *   pmem_commit_bench PROVIDER FILE ITERS SIZE...
 *
 * Prints one line per size: size, median write+commit µs, median local store+msync µs; then the
 * commit bandwidth (16 writes with FI_COMMIT_COMPLETE of 1 MiB in flight). Both CQs are polled,
 * so providers with manual progress move on both sides.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_eq.h>

#include "../tests/c/vf_check.h"

static struct fid_cq *cq_i, *cq_t;

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

/* Wait for `n` initiator completions, driving the target's progress too. */
static void wait_n(int n)
{
	struct fi_cq_entry e[16];
	double end = now_us() + 30e6;
	while (n > 0) {
		ssize_t r = fi_cq_read(cq_i, e, n < 16 ? n : 16);
		if (r > 0) {
			n -= (int)r;
			continue;
		}
		if (r == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			fi_cq_readerr(cq_i, &err, 0);
			fprintf(stderr, "error completion: %s (%d)\n", fi_strerror(err.err), err.err);
			exit(1);
		}
		CHECK(r == -FI_EAGAIN);
		(void)fi_cq_read(cq_t, e, 0);
		CHECK(now_us() < end);
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp);
	return v[n / 2];
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: %s PROVIDER FILE ITERS SIZE...\n", argv[0]);
		return 2;
	}
	const char *prov = argv[1], *path = argv[2];
	int iters = atoi(argv[3]);
	CHECK(iters > 0);
	size_t max = 1 << 20;
	for (int i = 4; i < argc; i++)
		if ((size_t)atol(argv[i]) > max)
			max = atol(argv[i]);

	struct fi_info *hints = fi_allocinfo(), *info = NULL;
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_RMA | FI_RMA_PMEM;
	hints->domain_attr->mr_mode =
		FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	hints->fabric_attr->prov_name = strdup(prov);
	const char *node = strcmp(prov, "vfabric") ? "127.0.0.1" : NULL;
	int rc = fi_getinfo(FI_VERSION(1, 17), node, NULL, 0, hints, &info);
	int msg_ep = 0;
	if (rc) {
		/* No FI_RMA_PMEM on RDM endpoints: a connected MSG endpoint pair. */
		hints->ep_attr->type = FI_EP_MSG;
		msg_ep = 1;
		rc = fi_getinfo(FI_VERSION(1, 17), node, "9239", FI_SOURCE, hints, &info);
	}
	if (rc) {
		fprintf(stderr, "fi_getinfo(%s, FI_RMA_PMEM): %s\n", prov, fi_strerror(-rc));
		return 1;
	}
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_av *av = NULL;
	struct fid_ep *ep_t, *ep_i;
	struct fid_eq *eq = NULL;
	struct fid_pep *pep = NULL;
	struct fi_info *cinfo = NULL;
	CHECK(fi_fabric(info->fabric_attr, &fabric, NULL) == 0);
	CHECK(fi_domain(fabric, info, &domain, NULL) == 0);
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT, .size = 64 };
	CHECK(fi_cq_open(domain, &cq_attr, &cq_i, NULL) == 0);
	CHECK(fi_cq_open(domain, &cq_attr, &cq_t, NULL) == 0);
	fi_addr_t target = 0;
	if (!msg_ep) {
		struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
		CHECK(fi_av_open(domain, &av_attr, &av, NULL) == 0);
		CHECK(fi_endpoint(domain, info, &ep_t, NULL) == 0);
		CHECK(fi_endpoint(domain, info, &ep_i, NULL) == 0);
		CHECK(fi_ep_bind(ep_t, &av->fid, 0) == 0);
		CHECK(fi_ep_bind(ep_i, &av->fid, 0) == 0);
		CHECK(fi_ep_bind(ep_t, &cq_t->fid, FI_TRANSMIT | FI_RECV) == 0);
		CHECK(fi_ep_bind(ep_i, &cq_i->fid, FI_TRANSMIT | FI_RECV) == 0);
		CHECK(fi_enable(ep_t) == 0);
		CHECK(fi_enable(ep_i) == 0);
		char name[256];
		size_t len = sizeof(name);
		CHECK(fi_getname(&ep_t->fid, name, &len) == 0);
		CHECK(fi_av_insert(av, name, 1, &target, 0, NULL) == 1);
	} else {
		struct fi_eq_attr eq_attr = { .size = 16, .wait_obj = FI_WAIT_UNSPEC };
		struct fi_eq_cm_entry entry;
		uint32_t event;
		CHECK(fi_eq_open(fabric, &eq_attr, &eq, NULL) == 0);
		CHECK(fi_passive_ep(fabric, info, &pep, NULL) == 0);
		CHECK(fi_pep_bind(pep, &eq->fid, 0) == 0);
		CHECK(fi_listen(pep) == 0);
		CHECK(fi_getinfo(FI_VERSION(1, 17), "127.0.0.1", "9239", 0, hints, &cinfo) == 0);
		CHECK(fi_endpoint(domain, cinfo, &ep_i, NULL) == 0);
		CHECK(fi_ep_bind(ep_i, &eq->fid, 0) == 0);
		CHECK(fi_ep_bind(ep_i, &cq_i->fid, FI_TRANSMIT | FI_RECV) == 0);
		CHECK(fi_enable(ep_i) == 0);
		CHECK(fi_connect(ep_i, cinfo->dest_addr, NULL, 0) == 0);
		CHECK(fi_eq_sread(eq, &event, &entry, sizeof(entry), 10000, 0) > 0);
		CHECK(event == FI_CONNREQ);
		CHECK(fi_endpoint(domain, entry.info, &ep_t, NULL) == 0);
		fi_freeinfo(entry.info);
		CHECK(fi_ep_bind(ep_t, &eq->fid, 0) == 0);
		CHECK(fi_ep_bind(ep_t, &cq_t->fid, FI_TRANSMIT | FI_RECV) == 0);
		CHECK(fi_enable(ep_t) == 0);
		CHECK(fi_accept(ep_t, NULL, 0) == 0);
		for (int connected = 0; connected < 2;) {
			CHECK(fi_eq_sread(eq, &event, &entry, sizeof(entry), 10000, 0) > 0);
			CHECK(event == FI_CONNECTED);
			connected++;
		}
	}
	fi_freeinfo(hints);

	int fd = open(path, O_RDWR | O_CREAT, 0600);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, max) == 0);
	char *map = mmap(NULL, max, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(map != MAP_FAILED);
	int mr_mode = info->domain_attr->mr_mode;
	struct fid_mr *mr;
	CHECK(fi_mr_reg(domain, map, max, FI_REMOTE_WRITE, 0, 0, FI_RMA_PMEM, &mr, NULL) == 0);
	if (mr_mode & FI_MR_ENDPOINT) {
		CHECK(fi_mr_bind(mr, &ep_t->fid, 0) == 0);
		CHECK(fi_mr_enable(mr) == 0);
	}
	uint64_t key = fi_mr_key(mr);
	uint64_t base = (mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)map : 0;
	char *src = aligned_alloc(4096, max);
	CHECK(src);
	memset(src, 0x5a, max);
	struct fid_mr *smr = NULL;
	void *desc = NULL;
	if (mr_mode & FI_MR_LOCAL) {
		CHECK(fi_mr_reg(domain, src, max, FI_WRITE, 0, 0, 0, &smr, NULL) == 0);
		if (mr_mode & FI_MR_ENDPOINT) {
			CHECK(fi_mr_bind(smr, &ep_i->fid, 0) == 0);
			CHECK(fi_mr_enable(smr) == 0);
		}
		desc = fi_mr_desc(smr);
	}

	printf("provider %s (%s, %s endpoints), file %s, medians of %d\n", prov,
	       info->fabric_attr->prov_name, msg_ep ? "MSG" : "RDM", path, iters);
	printf("%10s  %16s  %16s\n", "size", "write+commit us", "local msync us");
	double *lat = calloc(iters, sizeof(double)), *floor_us = calloc(iters, sizeof(double));
	CHECK(lat && floor_us);
	long page = sysconf(_SC_PAGESIZE);
	for (int a = 4; a < argc; a++) {
		size_t size = atol(argv[a]);
		struct iovec iov = { .iov_base = src, .iov_len = size };
		struct fi_rma_iov rma = { .addr = base, .len = size, .key = key };
		struct fi_msg_rma msg = { .msg_iov = &iov, .desc = &desc, .iov_count = 1,
					  .addr = target, .rma_iov = &rma, .rma_iov_count = 1 };
		for (int i = 0; i < iters; i++) {
			double t0 = now_us();
			CHECK(fi_writemsg(ep_i, &msg, FI_COMMIT_COMPLETE) == 0);
			wait_n(1);
			lat[i] = now_us() - t0;
			t0 = now_us();
			memcpy(map, src, size);
			CHECK(msync(map, (size + page - 1) / page * page, MS_SYNC) == 0);
			floor_us[i] = now_us() - t0;
		}
		printf("%10zu  %16.2f  %16.2f\n", size, median(lat, iters), median(floor_us, iters));
	}
	/* Commit bandwidth: 16 writes of 1 MiB with FI_COMMIT_COMPLETE in flight. */
	{
		size_t size = 1 << 20;
		int window = 16, total = 8 * window, posted = 0, done = 0;
		struct iovec iov = { .iov_base = src, .iov_len = size };
		struct fi_rma_iov rma = { .addr = base, .len = size, .key = key };
		struct fi_msg_rma msg = { .msg_iov = &iov, .desc = &desc, .iov_count = 1,
					  .addr = target, .rma_iov = &rma, .rma_iov_count = 1 };
		double t0 = now_us();
		while (done < total) {
			while (posted < total && posted - done < window) {
				rc = fi_writemsg(ep_i, &msg, FI_COMMIT_COMPLETE);
				if (rc == -FI_EAGAIN)
					break;
				CHECK(rc == 0);
				posted++;
			}
			wait_n(1);
			done++;
		}
		double us = now_us() - t0;
		printf("commit bandwidth (1 MiB, window %d): %.1f MB/s\n", window,
		       total * (double)size / us);
	}
	if (smr)
		fi_close(&smr->fid);
	fi_close(&mr->fid);
	fi_close(&ep_i->fid);
	fi_close(&ep_t->fid);
	if (pep)
		fi_close(&pep->fid);
	fi_close(&cq_i->fid);
	fi_close(&cq_t->fid);
	if (av)
		fi_close(&av->fid);
	if (eq)
		fi_close(&eq->fid);
	if (cinfo)
		fi_freeinfo(cinfo);
	fi_close(&domain->fid);
	fi_close(&fabric->fid);
	fi_freeinfo(info);
	munmap(map, max);
	close(fd);
	free(src);
	free(lat);
	free(floor_us);
	return 0;
}
