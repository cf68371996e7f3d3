/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Persistent memory through the vfabric provider (fi_vfabric.h): a file mmap'ed MAP_SHARED and
 * registered with FI_RMA_PMEM; RMA writes with FI_COMMIT_COMPLETE; FI_SAVE on fi_writemsg; the
 * commit extension (FI_VFABRIC_EP_OPS_V1). The device's persistence counters must move by
 * exactly the committed ranges; anonymous memory with FI_RMA_PMEM is refused; a commit to a
 * region that is not persistent fails with FI_EACCES. The endpoint writes to itself. Built and
 * run by tests/provider.rs with FI_PROVIDER_PATH and VFABRIC_DEVICES set.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include "fi_vfabric.h"

#include "vf_test_rdm.h"

#define FILE_LEN (4 * 4096)

static struct fid_cq *cq;

/* One transmit completion (bounded wait): 0, or the error entry's err. */
static int wait_one(void)
{
	struct fi_cq_entry e;
	time_t end = time(NULL) + 20;
	for (;;) {
		ssize_t r = fi_cq_read(cq, &e, 1);
		if (r == 1)
			return 0;
		if (r == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			CHECK(fi_cq_readerr(cq, &err, 0) == 1);
			return err.err;
		}
		CHECK(r == -FI_EAGAIN);
		CHECK(time(NULL) < end);
	}
}

static void file_bytes(int fd, off_t off, void *buf, size_t n)
{
	CHECK(pread(fd, buf, n, off) == (ssize_t)n);
}

int main(void)
{
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA | FI_RMA_PMEM, FI_MR_PROV_KEY | FI_MR_VIRT_ADDR);
	CHECK(r.info->caps & FI_RMA_PMEM);
	struct fid_domain *domain = r.domain;
	struct fi_vfabric_domain_ops_v1 *dops = NULL;
	CHECK(fi_open_ops(&domain->fid, FI_VFABRIC_DOMAIN_OPS_V1, 0, (void **)&dops, NULL) == 0);

	/* The store granularity is a vendor attribute of the device. */
	struct fi_vfabric_attr attrs[64];
	size_t n = 64;
	CHECK(dops->vendor_attrs(domain, attrs, &n) == 0);
	int seen = 0;
	for (size_t i = 0; i < n; i++)
		if (attrs[i].vendor == FI_VFABRIC_VENDOR_ID && !strcmp(attrs[i].name, "pmem_granularity"))
			seen = !strcmp(attrs[i].text, "page");
	CHECK(seen);

	rdm_open_ep(&r);
	struct fid_ep *ep = r.ep;
	cq = r.cq;
	fi_addr_t me = rdm_self(&r);

	/* The persistent file. */
	char path[] = "/tmp/vf_pmem_test.XXXXXX";
	int fd = mkstemp(path);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, FILE_LEN) == 0);
	char *map = mmap(NULL, FILE_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(map != MAP_FAILED);
	struct fid_mr *mr;
	CHECK(fi_mr_reg(domain, map, FILE_LEN, FI_REMOTE_WRITE | FI_REMOTE_READ, 0, 0, FI_RMA_PMEM,
			&mr, NULL) == 0);
	uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)map;

	/* Anonymous memory with FI_RMA_PMEM is refused; registered plainly, it is not persistent. */
	char *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(anon != MAP_FAILED);
	struct fid_mr *bad;
	CHECK(fi_mr_reg(domain, anon, 4096, FI_REMOTE_WRITE, 0, 0, FI_RMA_PMEM, &bad, NULL) ==
	      -FI_EINVAL);
	struct fid_mr *plain;
	CHECK(fi_mr_reg(domain, anon, 4096, FI_REMOTE_WRITE, 0, 0, 0, &plain, NULL) == 0);

	struct fi_vfabric_counters c0, c1;
	CHECK(dops->counters(domain, &c0) == 0);

	/* A write with FI_COMMIT_COMPLETE straddling a page boundary. */
	char src[200], got[200];
	for (int i = 0; i < 200; i++)
		src[i] = (char)(i * 7 + 1);
	struct iovec iov = { .iov_base = src, .iov_len = 100 };
	struct fi_rma_iov rma = { .addr = base + 4050, .len = 100, .key = key };
	struct fi_msg_rma msg = { .msg_iov = &iov, .iov_count = 1, .addr = me,
				  .rma_iov = &rma, .rma_iov_count = 1 };
	CHECK(fi_writemsg(ep, &msg, FI_COMMIT_COMPLETE) == 0);
	CHECK(wait_one() == 0);
	file_bytes(fd, 4050, got, 100);
	CHECK(!memcmp(got, src, 100));
	CHECK(dops->counters(domain, &c1) == 0);
	CHECK(c1.persisted_ranges == c0.persisted_ranges + 1);
	CHECK(c1.persisted_bytes == c0.persisted_bytes + 100);

	/* A plain write persists nothing; FI_SAVE | FI_COMMIT_COMPLETE then persists its range. */
	CHECK(fi_write(ep, src + 100, 50, NULL, me, base + 9000, key, NULL) == 0);
	CHECK(wait_one() == 0);
	CHECK(dops->counters(domain, &c0) == 0);
	CHECK(c0.persisted_ranges == c1.persisted_ranges);
	struct fi_rma_iov save_rma = { .addr = base + 9000, .len = 50, .key = key };
	struct fi_msg_rma save = { .msg_iov = NULL, .iov_count = 0, .addr = me,
				   .rma_iov = &save_rma, .rma_iov_count = 1 };
	CHECK(fi_writemsg(ep, &save, FI_SAVE | FI_COMMIT_COMPLETE) == 0);
	CHECK(wait_one() == 0);
	CHECK(dops->counters(domain, &c1) == 0);
	CHECK(c1.persisted_ranges == c0.persisted_ranges + 1);
	CHECK(c1.persisted_bytes == c0.persisted_bytes + 50);
	file_bytes(fd, 9000, got, 50);
	CHECK(!memcmp(got, src + 100, 50));

	/* The commit extension. */
	void *unknown = NULL;
	CHECK(fi_open_ops(&ep->fid, "fi_vfabric_ep_ops_v0", 0, &unknown, NULL) == -FI_ENOSYS);
	struct fi_vfabric_ep_ops_v1 *eops = NULL;
	CHECK(fi_open_ops(&ep->fid, FI_VFABRIC_EP_OPS_V1, 0, (void **)&eops, NULL) == 0);
	CHECK(eops && eops->size == sizeof(*eops));
	struct fi_rma_iov two[2] = { { .addr = base + 1, .len = 10, .key = key },
				     { .addr = base + 12000, .len = 300, .key = key } };
	CHECK(eops->commit(ep, two, 2, me, 0, NULL) == 0);
	CHECK(wait_one() == 0);
	CHECK(dops->counters(domain, &c0) == 0);
	CHECK(c0.persisted_ranges == c1.persisted_ranges + 2);
	CHECK(c0.persisted_bytes == c1.persisted_bytes + 310);

	/* A commit to a region that is not persistent: FI_EACCES. */
	struct fi_rma_iov p = { .addr = (uint64_t)(uintptr_t)anon, .len = 8, .key = fi_mr_key(plain) };
	CHECK(eops->commit(ep, &p, 1, me, 0, NULL) == 0);
	CHECK(wait_one() == FI_EACCES);
	/* Nor may a write ask for FI_COMMIT_COMPLETE there. */
	struct fi_msg_rma pmsg = { .msg_iov = &iov, .iov_count = 1, .addr = me,
				   .rma_iov = &p, .rma_iov_count = 1 };
	iov.iov_len = 8;
	CHECK(fi_writemsg(ep, &pmsg, FI_COMMIT_COMPLETE) == 0);
	CHECK(wait_one() == FI_EACCES);

	fi_close(&mr->fid);
	fi_close(&plain->fid);
	rdm_close(&r);
	munmap(map, FILE_LEN);
	munmap(anon, 4096);
	close(fd);
	unlink(path);
	printf("pmem: ok\n");
	return 0;
}
