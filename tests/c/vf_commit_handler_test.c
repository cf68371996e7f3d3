/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The target commit handler through the provider (fi_vfabric.h, FI_VFABRIC_EP_OPS_V2): the
 * handler sees each commit's ranges, flags and initiator; its 0 completes the commit, any other
 * value fails it at the initiator with FI_EIO, prov_errno COMMIT_REFUSED (16) and the value in
 * fi_cq_err_entry.data; FI_SAVE | FI_COMMIT_COMPLETE goes through it too, a visibility save
 * does not; regions registered before the handler are not handled; removing the handler
 * accepts commits; version 1 of the ops still opens. The endpoint commits to itself: its own
 * fi_cq_read drives the progress that runs the handler. Built and run by tests/provider.rs
 * with FI_PROVIDER_PATH and VFABRIC_DEVICES set (also under valgrind).
 */
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
static struct fi_cq_err_entry last_err;

/* One transmit completion (bounded wait): 0, or the error entry's err (kept in last_err). */
static int wait_one(void)
{
	struct fi_cq_entry e;
	time_t end = time(NULL) + 20;
	for (;;) {
		ssize_t r = fi_cq_read(cq, &e, 1);
		if (r == 1)
			return 0;
		if (r == -FI_EAVAIL) {
			memset(&last_err, 0, sizeof(last_err));
			CHECK(fi_cq_readerr(cq, &last_err, 0) == 1);
			return last_err.err;
		}
		CHECK(r == -FI_EAGAIN);
		CHECK(time(NULL) < end);
	}
}

struct seen {
	int calls;
	int answer;
	uint64_t flags;
	size_t count;
	struct fi_rma_iov iov[4];
	uint8_t src[16];
	size_t src_len;
};

static int handler(const struct fi_vfabric_commit_event *ev, void *context)
{
	struct seen *s = context;
	s->calls++;
	s->flags = ev->flags;
	s->count = ev->count;
	for (size_t i = 0; i < ev->count && i < 4; i++)
		s->iov[i] = ev->rma_iov[i];
	memcpy(s->src, ev->src_addr, sizeof(s->src));
	s->src_len = ev->src_addrlen;
	return s->answer;
}

static int open_file(char *path, char **map)
{
	int fd = mkstemp(path);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, FILE_LEN) == 0);
	*map = mmap(NULL, FILE_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(*map != MAP_FAILED);
	return fd;
}

int main(void)
{
	struct rdm r;
	rdm_open_domain_with(&r, FI_MSG | FI_RMA | FI_RMA_PMEM, FI_MR_PROV_KEY | FI_MR_VIRT_ADDR);
	rdm_open_ep(&r);
	struct fid_domain *domain = r.domain;
	struct fid_ep *ep = r.ep;
	cq = r.cq;
	fi_addr_t me = rdm_self(&r);
	/* The handler must see this endpoint's address as the initiator's. */
	char name[16];
	size_t len = sizeof(name);
	CHECK(fi_getname(&ep->fid, name, &len) == 0);

	/* Version 1 still opens; version 2 carries the handler. */
	struct fi_vfabric_ep_ops_v1 *v1 = NULL;
	CHECK(fi_open_ops(&ep->fid, FI_VFABRIC_EP_OPS_V1, 0, (void **)&v1, NULL) == 0);
	CHECK(v1 && v1->size == sizeof(*v1));
	struct fi_vfabric_ep_ops_v2 *ops = NULL;
	CHECK(fi_open_ops(&ep->fid, FI_VFABRIC_EP_OPS_V2, 0, (void **)&ops, NULL) == 0);
	CHECK(ops && ops->size == sizeof(*ops));

	/* A region registered before the handler is not handled. */
	char early_path[] = "/tmp/vf_commit_early.XXXXXX", *early_map;
	int early_fd = open_file(early_path, &early_map);
	struct fid_mr *early;
	CHECK(fi_mr_reg(domain, early_map, FILE_LEN, FI_REMOTE_WRITE, 0, 0, FI_RMA_PMEM, &early,
			NULL) == 0);

	struct seen s = { 0 };
	CHECK(ops->set_commit_handler(ep, handler, &s) == 0);

	char path[] = "/tmp/vf_commit_handler.XXXXXX", *map;
	int fd = open_file(path, &map);
	struct fid_mr *mr;
	CHECK(fi_mr_reg(domain, map, FILE_LEN, FI_REMOTE_WRITE | FI_REMOTE_READ, 0, 0, FI_RMA_PMEM,
			&mr, NULL) == 0);
	uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)map;

	/* Success: the handler saw the ranges and the initiator, then the commit completed. */
	struct fi_rma_iov two[2] = { { .addr = base + 10, .len = 100, .key = key },
				     { .addr = base + 5000, .len = 3000, .key = key } };
	CHECK(ops->commit(ep, two, 2, me, 0, NULL) == 0);
	CHECK(wait_one() == 0);
	CHECK(s.calls == 1);
	CHECK(s.count == 2);
	CHECK(s.iov[0].addr == two[0].addr && s.iov[0].len == 100 && s.iov[0].key == key);
	CHECK(s.iov[1].addr == two[1].addr && s.iov[1].len == 3000 && s.iov[1].key == key);
	CHECK(s.flags & FI_COMMIT_COMPLETE);
	CHECK(s.src_len == 16 && !memcmp(s.src, name, 16));

	/* A refusal reaches the initiator with the handler's value. */
	s.answer = 77;
	CHECK(ops->commit(ep, two, 1, me, 0, NULL) == 0);
	CHECK(wait_one() == FI_EIO);
	CHECK(last_err.prov_errno == 16);
	CHECK((int64_t)last_err.data == 77);
	CHECK(s.calls == 2);
	s.answer = -FI_EIO;
	CHECK(ops->commit(ep, two, 1, me, 0, NULL) == 0);
	CHECK(wait_one() == FI_EIO);
	CHECK((int64_t)last_err.data == -FI_EIO);

	/* A save at FI_COMMIT_COMPLETE is a commit; a visibility save is not. */
	s.answer = 0;
	struct fi_msg_rma save = { .msg_iov = NULL, .iov_count = 0, .addr = me,
				   .rma_iov = two, .rma_iov_count = 1 };
	CHECK(fi_writemsg(ep, &save, FI_SAVE | FI_COMMIT_COMPLETE) == 0);
	CHECK(wait_one() == 0);
	CHECK(s.calls == 4);
	CHECK(s.flags & FI_SAVE);
	CHECK(fi_writemsg(ep, &save, FI_SAVE | FI_DELIVERY_COMPLETE) == 0);
	CHECK(wait_one() == 0);
	CHECK(s.calls == 4);

	/* The region registered before the handler commits without it. */
	s.answer = 5;
	struct fi_rma_iov e = { .addr = (uint64_t)(uintptr_t)early_map, .len = 8,
				.key = fi_mr_key(early) };
	CHECK(ops->commit(ep, &e, 1, me, 0, NULL) == 0);
	CHECK(wait_one() == 0);
	CHECK(s.calls == 4);

	/* Without a handler, commits to handled regions are accepted. */
	CHECK(ops->set_commit_handler(ep, NULL, NULL) == 0);
	CHECK(ops->commit(ep, two, 1, me, 0, NULL) == 0);
	CHECK(wait_one() == 0);
	CHECK(s.calls == 4);

	fi_close(&mr->fid);
	fi_close(&early->fid);
	rdm_close(&r);
	munmap(map, FILE_LEN);
	munmap(early_map, FILE_LEN);
	close(fd);
	close(early_fd);
	unlink(path);
	unlink(early_path);
	printf("commit handler: ok\n");
	return 0;
}
