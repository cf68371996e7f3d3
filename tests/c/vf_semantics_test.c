/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Semantics of the vfabric provider that libfabric programs rely on (issue 10, section 2), two
 * processes (fork) with one RDM endpoint each, on the first and second device of
 * VFABRIC_DEVICES, exchanging names and keys over pipes. Built and run by tests/provider.rs.
 *
 *   vf_semantics_test <suite>
 *     multi_recv  FI_MULTI_RECV: each completion's buf points where the message landed, the
 *                 completion that releases the buffer carries FI_MULTI_RECV, across two buffers
 *     writedata   a stream of fi_writedata with remote CQ data consumed at the target, then a
 *                 reply message, for a consumer without FI_RX_CQ_DATA and one with it
 *     keys        without FI_MR_PROV_KEY the key requested in fi_mr_reg is the region's key
 *     fallback    fi_domain on an info whose device another process took opens a free device
 *                 of the same fabric; fi_getinfo does not wait for busy devices
 *     zero_len    zero-byte tagged messages and receives (as MPI's barrier uses)
 *     op_flags    the hints' default op_flags (FI_COMPLETION) under FI_SELECTIVE_COMPLETION
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_tagged.h>

static const char *who = "parent";

#define VF_WHO who
#include "vf_check.h"

/* VFABRIC_DEVICES as the test started (each side narrows its own copy to one device). */
static const char *all_devices;

/* The `i`th socket of VFABRIC_DEVICES (i = 0, 1). */
static char *device(int i)
{
	const char *list = all_devices;
	CHECK(list);
	char *copy = strdup(list), *save = NULL;
	char *tok = strtok_r(copy, ":", &save);
	for (int k = 0; k < i && tok; k++)
		tok = strtok_r(NULL, ":", &save);
	CHECK(tok);
	char *out = strdup(tok);
	free(copy);
	return out;
}

struct side {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep;
	fi_addr_t peer;
};

static struct fi_info *getinfo(uint64_t caps, uint64_t mode, int mr_mode)
{
	struct fi_info *hints = fi_allocinfo(), *out = NULL;
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = caps;
	hints->mode = mode;
	hints->domain_attr->mr_mode = mr_mode;
	hints->fabric_attr->prov_name = strdup("vfabric");
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out));
	fi_freeinfo(hints);
	return out;
}

static void side_open_with(struct side *s, struct fi_info *info)
{
	s->info = info;
	OK(fi_fabric(info->fabric_attr, &s->fabric, NULL));
	OK(fi_domain(s->fabric, info, &s->domain, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(s->domain, &av_attr, &s->av, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_TAGGED, .size = 256 };
	OK(fi_cq_open(s->domain, &cq_attr, &s->cq, NULL));
	OK(fi_endpoint(s->domain, info, &s->ep, NULL));
	OK(fi_ep_bind(s->ep, &s->av->fid, 0));
	OK(fi_ep_bind(s->ep, &s->cq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(s->ep));
}

static void side_open(struct side *s, uint64_t caps, uint64_t mode, int mr_mode)
{
	side_open_with(s, getinfo(caps, mode, mr_mode));
}

static void side_close(struct side *s)
{
	OK(fi_close(&s->ep->fid));
	OK(fi_close(&s->cq->fid));
	OK(fi_close(&s->av->fid));
	OK(fi_close(&s->domain->fid));
	OK(fi_close(&s->fabric->fid));
	fi_freeinfo(s->info);
}

/* Pipes between the two processes: [0] parent -> child, [1] child -> parent. */
static int pipes[2][2];
static int is_child;

static void put(const void *b, size_t n)
{
	CHECK(write(pipes[is_child][1], b, n) == (ssize_t)n);
}

static void get(void *b, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(pipes[!is_child][0], (char *)b + got, n - got);
		CHECK(r > 0);
		got += (size_t)r;
	}
}

/* After fork: a side keeps the write end of its pipe and the read end of the other's, so a
 * read sees end-of-file (and fails the check) when the other side dies. */
static void close_unused_pipe_ends(void)
{
	close(pipes[is_child][0]);
	close(pipes[!is_child][1]);
}

/* Trade endpoint names; the peer goes into the AV. */
static void exchange_names(struct side *s)
{
	char name[64];
	size_t len = sizeof(name);
	OK(fi_getname(&s->ep->fid, name, &len));
	put(&len, sizeof(len));
	put(name, len);
	char peer[64];
	size_t plen;
	get(&plen, sizeof(plen));
	CHECK(plen <= sizeof(peer));
	get(peer, plen);
	CHECK_RC(fi_av_insert(s->av, peer, 1, &s->peer, 0, NULL), 1);
}

/* One completion from `cq`, within 20 s. */
static void wait_cq(struct fid_cq *cq, struct fi_cq_tagged_entry *e)
{
	time_t end = time(NULL) + 20;
	for (long i = 0;; i++) {
		ssize_t r = fi_cq_read(cq, e, 1);
		if (r == 1)
			return;
		if (r == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			fi_cq_readerr(cq, &err, 0);
			fprintf(stderr, "%s: error completion: %s\n", who, fi_strerror(err.err));
			exit(1);
		}
		CHECK_RC(r, -FI_EAGAIN);
		if ((i & 1023) == 0 && time(NULL) > end) {
			fprintf(stderr, "%s: no completion within 20 s\n", who);
			exit(1);
		}
	}
}

/* Runs `fn(0)` in this process on the first device and `fn(1)` in a child on the second. */
static void two_sides(void (*fn)(int))
{
	CHECK(pipe(pipes[0]) == 0 && pipe(pipes[1]) == 0);
	char *dev[2] = { device(0), device(1) };
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		is_child = 1;
		who = "child";
		close_unused_pipe_ends();
		setenv("VFABRIC_DEVICES", dev[1], 1);
		free(dev[0]);
		free(dev[1]);
		fn(1);
		exit(0);
	}
	close_unused_pipe_ends();
	setenv("VFABRIC_DEVICES", dev[0], 1);
	fn(0);
	int status = 0;
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	free(dev[0]);
	free(dev[1]);
}

/* --- multi_recv --- */

static void multi_recv_side(int me)
{
	struct side s;
	side_open(&s, FI_MSG | FI_MULTI_RECV, 0, 0);
	exchange_names(&s);
	enum { N = 12, LEN = 100 };
	if (me == 1) {
		/* Two buffers of 512 bytes, FI_OPT_MIN_MULTI_RECV 200: each takes 4 messages (the
		 * fourth leaves 112 < 200 free and releases it), the rest go to the next buffer. */
		size_t min = 200;
		OK(fi_setopt(&s.ep->fid, FI_OPT_ENDPOINT, FI_OPT_MIN_MULTI_RECV, &min, sizeof(min)));
		static char bufs[3][512];
		for (int b = 0; b < 3; b++) {
			struct iovec iov = { bufs[b], sizeof(bufs[b]) };
			struct fi_msg m = { .msg_iov = &iov, .iov_count = 1, .addr = FI_ADDR_UNSPEC,
					    .context = (void *)(uintptr_t)(0x100 + b) };
			OK(fi_recvmsg(s.ep, &m, FI_MULTI_RECV));
		}
		char go = 1;
		put(&go, 1);
		for (int i = 0; i < N; i++) {
			struct fi_cq_tagged_entry e;
			wait_cq(s.cq, &e);
			int b = i / 4, k = i % 4;
			CHECK(e.op_context == (void *)(uintptr_t)(0x100 + b));
			CHECK(e.len == LEN && (e.flags & FI_RECV) && (e.flags & FI_MSG));
			CHECK(e.buf == bufs[b] + k * LEN);
			for (int j = 0; j < LEN; j++)
				CHECK(((char *)e.buf)[j] == (char)(i + j));
			CHECK(!!(e.flags & FI_MULTI_RECV) == (k == 3));
		}
		put(&go, 1);
	} else {
		char go;
		get(&go, 1);
		char tx[LEN];
		for (int i = 0; i < N; i++) {
			for (int j = 0; j < LEN; j++)
				tx[j] = (char)(i + j);
			OK(fi_send(s.ep, tx, LEN, NULL, s.peer, NULL));
			struct fi_cq_tagged_entry e;
			wait_cq(s.cq, &e);
			CHECK(e.flags & FI_SEND);
		}
		get(&go, 1);
	}
	side_close(&s);
}

/* --- writedata --- */

static uint64_t writedata_mode;

/* Remote CQ data of a write takes a posted receive at the target (FI_RX_CQ_DATA). A consumer
 * that accepts the mode posts receives for the notifications and gets one completion per
 * write, in order before the message that follows; one that does not is granted no remote CQ
 * data with RMA (cq_data_size 0, fi_writedata -FI_EINVAL), so its message receives are never
 * taken by writes. Either way the stream, the "done" message and the reply complete. */
static void writedata_side(int me)
{
	struct side s;
	side_open(&s, FI_MSG | FI_RMA, writedata_mode, FI_MR_PROV_KEY | FI_MR_VIRT_ADDR);
	int with_data = !!(writedata_mode & FI_RX_CQ_DATA);
	CHECK(!!(s.info->mode & FI_RX_CQ_DATA) == with_data);
	CHECK(with_data ? s.info->domain_attr->cq_data_size >= 4 : s.info->domain_attr->cq_data_size == 0);
	exchange_names(&s);
	/* N receives fit the receive queue (rx_attr->size) beside "done". */
	enum { N = 48, LEN = 256 };
	if (me == 1) {
		static char region[N * LEN];
		struct fid_mr *mr;
		OK(fi_mr_reg(s.domain, region, sizeof(region), FI_REMOTE_WRITE, 0, 0, 0, &mr, NULL));
		uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)region;
		/* Receives in posting order: one per notification (FI_RX_CQ_DATA), then "done". */
		static char done[16];
		for (int i = 0; with_data && i < N; i++)
			OK(fi_recv(s.ep, NULL, 0, NULL, FI_ADDR_UNSPEC, (void *)0xc0));
		OK(fi_recv(s.ep, done, sizeof(done), NULL, FI_ADDR_UNSPEC, (void *)0xd0));
		put(&key, sizeof(key));
		put(&base, sizeof(base));
		for (int n = 0; n < (with_data ? N : 0); n++) {
			struct fi_cq_tagged_entry e;
			wait_cq(s.cq, &e);
			CHECK(e.op_context == (void *)0xc0);
			CHECK((e.flags & (FI_REMOTE_CQ_DATA | FI_RMA | FI_REMOTE_WRITE)) ==
			      (FI_REMOTE_CQ_DATA | FI_RMA | FI_REMOTE_WRITE));
			CHECK(e.data == (uint64_t)n && e.len == LEN);
			for (int j = 0; j < LEN; j++)
				CHECK(region[n * LEN + j] == (char)(n + j));
		}
		struct fi_cq_tagged_entry e;
		wait_cq(s.cq, &e);
		CHECK(e.op_context == (void *)0xd0 && (e.flags & FI_MSG) && !strcmp(done, "done"));
		for (int n = 0; n < N; n++)
			for (int j = 0; j < LEN; j++)
				CHECK(region[n * LEN + j] == (char)(n + j));
		/* The reply. */
		OK(fi_send(s.ep, "reply", 6, NULL, s.peer, (void *)0xe0));
		wait_cq(s.cq, &e);
		CHECK(e.op_context == (void *)0xe0);
		char go;
		get(&go, 1);
		OK(fi_close(&mr->fid));
	} else {
		uint64_t key, base;
		get(&key, sizeof(key));
		get(&base, sizeof(base));
		static char reply[16];
		OK(fi_recv(s.ep, reply, sizeof(reply), NULL, FI_ADDR_UNSPEC, (void *)0xf0));
		static char src[N * LEN];
		if (!with_data)
			CHECK_RC(fi_writedata(s.ep, src, LEN, NULL, 1, s.peer, base, key, (void *)0xa0), -FI_EINVAL);
		int completions = 0;
		for (int i = 0; i < N; i++) {
			for (int j = 0; j < LEN; j++)
				src[i * LEN + j] = (char)(i + j);
			ssize_t r;
			for (;;) {
				r = with_data ? fi_writedata(s.ep, src + i * LEN, LEN, NULL, (uint64_t)i, s.peer,
							     base + (uint64_t)i * LEN, key, (void *)0xa0)
					      : fi_write(s.ep, src + i * LEN, LEN, NULL, s.peer,
							 base + (uint64_t)i * LEN, key, (void *)0xa0);
				if (r != -FI_EAGAIN)
					break;
				struct fi_cq_tagged_entry e;
				if (fi_cq_read(s.cq, &e, 1) == 1) {
					CHECK(e.op_context == (void *)0xa0);
					completions++;
				}
			}
			OK(r);
		}
		/* Every write completed before "done" goes, so the target sees them all. */
		while (completions < N) {
			struct fi_cq_tagged_entry e;
			wait_cq(s.cq, &e);
			CHECK(e.op_context == (void *)0xa0);
			completions++;
		}
		ssize_t r;
		while ((r = fi_send(s.ep, "done", 5, NULL, s.peer, (void *)0xb0)) == -FI_EAGAIN)
			;
		OK(r);
		int sent = 0, replied = 0;
		while (!sent || !replied) {
			struct fi_cq_tagged_entry e;
			wait_cq(s.cq, &e);
			if (e.op_context == (void *)0xb0)
				sent = 1;
			else if (e.op_context == (void *)0xf0)
				replied = !strcmp(reply, "reply");
			else
				CHECK(0);
		}
		char go = 1;
		put(&go, 1);
	}
	side_close(&s);
}

/* --- keys --- */

static void keys_side(int me)
{
	struct side s;
	/* No FI_MR_PROV_KEY: the application chooses keys. */
	side_open(&s, FI_MSG | FI_RMA, 0, FI_MR_VIRT_ADDR);
	CHECK(!(s.info->domain_attr->mr_mode & FI_MR_PROV_KEY));
	exchange_names(&s);
	/* A key using all 64 bits (domain_attr->mr_key_size is 8). */
	CHECK(s.info->domain_attr->mr_key_size == 8);
	const uint64_t want = 0xfedcba9876543210ULL;
	if (me == 1) {
		static char region[4096];
		struct fid_mr *mr, *dup;
		OK(fi_mr_reg(s.domain, region, sizeof(region), FI_REMOTE_WRITE | FI_REMOTE_READ, 0, want, 0, &mr, NULL));
		CHECK(fi_mr_key(mr) == want);
		/* A key in use is refused. */
		static char other[64];
		CHECK_RC(fi_mr_reg(s.domain, other, sizeof(other), FI_REMOTE_WRITE, 0, want, 0, &dup, NULL), -FI_ENOKEY);
		uint64_t base = (uint64_t)(uintptr_t)region;
		put(&base, sizeof(base));
		char go;
		get(&go, 1);
		CHECK(!strcmp(region + 100, "chosen key"));
		OK(fi_close(&mr->fid));
	} else {
		uint64_t base;
		get(&base, sizeof(base));
		/* The peer learns the key out of band (it is the agreed value) and writes with it. */
		OK(fi_write(s.ep, "chosen key", 11, NULL, s.peer, base + 100, want, (void *)1));
		struct fi_cq_tagged_entry e;
		wait_cq(s.cq, &e);
		CHECK(e.op_context == (void *)1);
		char go = 1;
		put(&go, 1);
	}
	side_close(&s);
}

/* --- fallback --- */

static void fallback(void)
{
	char *dev[2] = { device(0), device(1) };
	char list[512];
	snprintf(list, sizeof(list), "%s:%s", dev[0], dev[1]);
	CHECK(pipe(pipes[0]) == 0 && pipe(pipes[1]) == 0);
	pid_t pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		/* The child takes the first device and holds it until told. */
		is_child = 1;
		who = "child";
		close_unused_pipe_ends();
		setenv("VFABRIC_DEVICES", dev[0], 1);
		struct side s;
		side_open(&s, FI_MSG, 0, 0);
		char go = 1;
		put(&go, 1);
		get(&go, 1);
		side_close(&s);
		free(dev[0]);
		free(dev[1]);
		exit(0);
	}
	close_unused_pipe_ends();
	setenv("VFABRIC_DEVICES", list, 1);
	/* This process's fi_getinfo ran before the child took the device: both are listed. */
	struct fi_info *info = getinfo(FI_MSG, 0, 0);
	char *first = strdup(info->domain_attr->name);
	char go;
	get(&go, 1);
	/* The info names the taken device: fi_domain opens the free one of the same fabric. */
	struct side s;
	time_t t0 = time(NULL);
	side_open_with(&s, info);
	struct fi_info *dinfo = NULL;
	CHECK(time(NULL) - t0 <= 2);
	/* ... and it works: a message to itself. */
	char name[64];
	size_t len = sizeof(name);
	OK(fi_getname(&s.ep->fid, name, &len));
	fi_addr_t me;
	CHECK_RC(fi_av_insert(s.av, name, 1, &me, 0, NULL), 1);
	char rx[8] = { 0 };
	OK(fi_recv(s.ep, rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, NULL));
	OK(fi_send(s.ep, "moved", 6, NULL, me, NULL));
	struct fi_cq_tagged_entry e;
	wait_cq(s.cq, &e);
	wait_cq(s.cq, &e);
	CHECK(!strcmp(rx, "moved"));
	/* fi_getinfo while both devices are taken: the one this process holds is listed, the busy
	 * one is skipped without the full probe deadline. */
	struct fi_info *hints = fi_allocinfo();
	hints->ep_attr->type = FI_EP_RDM;
	hints->fabric_attr->prov_name = strdup("vfabric");
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	int rc = fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &dinfo);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
	/* This process holds one device itself (it is listed); the other is busy (skipped). */
	CHECK_RC(rc, 0);
	int n = 0;
	for (struct fi_info *i = dinfo; i; i = i->next)
		n += i->ep_attr->type == FI_EP_RDM;
	CHECK(n == 1);
	/* The busy device is not waited for with the driver's 2 s probe deadline. */
	CHECK(secs < 1.9);
	fi_freeinfo(dinfo);
	fi_freeinfo(hints);
	free(first);
	side_close(&s);
	put(&go, 1);
	int status = 0;
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	free(dev[0]);
	free(dev[1]);
}

/* --- zero_len --- */

/* Zero-byte tagged messages as Open MPI's barrier sends them: fi_tinjectdata with the sender's
 * rank as remote CQ data, received by a directed fi_trecv with ignore bits, every variant. */
static void zero_len_side(int me)
{
	struct side s;
	side_open(&s, FI_TAGGED | FI_DIRECTED_RECV, 0, 0);
	exchange_names(&s);
	enum { N = 20 };
	for (int variant = 0; variant < 4; variant++) {
		int inject = variant & 1, directed = variant & 2;
		fi_addr_t from = directed ? s.peer : FI_ADDR_UNSPEC;
		for (int i = 0; i < N; i++) {
			struct fi_cq_tagged_entry e;
			uint64_t tag = 0xfffffff0 + (uint64_t)me, ptag = 0xfffffff0 + (uint64_t)!me;
			/* Both sides post their receive, then send (as a barrier does). */
			OK(fi_trecv(s.ep, NULL, 0, NULL, from, ptag, 1ULL << 32, (void *)2));
			if (inject) {
				ssize_t r;
				while ((r = fi_tinjectdata(s.ep, NULL, 0, (uint64_t)me, s.peer, tag)) == -FI_EAGAIN)
					;
				OK(r);
			} else {
				OK(fi_tsenddata(s.ep, NULL, 0, NULL, (uint64_t)me, s.peer, tag, (void *)3));
				wait_cq(s.cq, &e);
				if (e.op_context == (void *)2) {
					CHECK(e.len == 0 && e.tag == ptag && e.data == (uint64_t)!me);
					wait_cq(s.cq, &e);
					CHECK(e.op_context == (void *)3);
					continue;
				}
				CHECK(e.op_context == (void *)3);
			}
			wait_cq(s.cq, &e);
			CHECK(e.op_context == (void *)2 && e.len == 0 && e.tag == ptag);
			CHECK((e.flags & FI_REMOTE_CQ_DATA) && e.data == (uint64_t)!me);
		}
	}
	/* The msg forms with no iov at all (iov_count 0). */
	struct fi_msg_tagged rm = { .msg_iov = NULL, .iov_count = 0, .addr = FI_ADDR_UNSPEC, .tag = 0x99,
				    .ignore = 0, .context = (void *)8 };
	struct fi_msg_tagged sm = { .msg_iov = NULL, .iov_count = 0, .addr = s.peer, .tag = 0x99,
				    .context = (void *)9 };
	struct fi_cq_tagged_entry e;
	OK(fi_trecvmsg(s.ep, &rm, FI_COMPLETION));
	OK(fi_tsendmsg(s.ep, &sm, FI_COMPLETION));
	for (int got = 0; got < 2; got++) {
		wait_cq(s.cq, &e);
		CHECK(e.op_context == (void *)8 || e.op_context == (void *)9);
		CHECK(e.len == 0);
	}
	char go = 1;
	put(&go, 1);
	get(&go, 1);
	side_close(&s);
}

/* --- op_flags --- */

/* Default operation flags from the hints (fi_getinfo(3), fi_endpoint(3)), as Open MPI uses
 * them: tx/rx op_flags FI_COMPLETION with a CQ bound under FI_SELECTIVE_COMPLETION, so that
 * fi_tsend/fi_trecv complete and fi_tinject does not. */
static void op_flags_side(int me)
{
	struct fi_info *hints = fi_allocinfo(), *info = NULL;
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_TAGGED;
	hints->mode = FI_CONTEXT;
	hints->tx_attr->op_flags = FI_COMPLETION;
	hints->rx_attr->op_flags = FI_COMPLETION;
	hints->fabric_attr->prov_name = strdup("vfabric");
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &info));
	fi_freeinfo(hints);
	CHECK(info->tx_attr->op_flags == FI_COMPLETION && info->rx_attr->op_flags == FI_COMPLETION);
	struct side s = { .info = info };
	OK(fi_fabric(info->fabric_attr, &s.fabric, NULL));
	OK(fi_domain(s.fabric, info, &s.domain, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(s.domain, &av_attr, &s.av, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_TAGGED, .size = 64 };
	OK(fi_cq_open(s.domain, &cq_attr, &s.cq, NULL));
	OK(fi_endpoint(s.domain, info, &s.ep, NULL));
	OK(fi_ep_bind(s.ep, &s.av->fid, 0));
	OK(fi_ep_bind(s.ep, &s.cq->fid, FI_TRANSMIT | FI_RECV | FI_SELECTIVE_COMPLETION));
	OK(fi_enable(s.ep));
	exchange_names(&s);
	struct fi_context ctx[2];
	char buf[8] = { 0 };
	struct fi_cq_tagged_entry e;
	if (me == 1) {
		OK(fi_trecv(s.ep, buf, sizeof(buf), NULL, FI_ADDR_UNSPEC, 5, 0, &ctx[0]));
		wait_cq(s.cq, &e);
		CHECK(e.op_context == &ctx[0] && e.tag == 5 && !strcmp(buf, "sent"));
		OK(fi_trecv(s.ep, buf, sizeof(buf), NULL, FI_ADDR_UNSPEC, 6, 0, &ctx[1]));
		wait_cq(s.cq, &e);
		CHECK(e.op_context == &ctx[1] && e.tag == 6 && !strcmp(buf, "inj"));
	} else {
		OK(fi_tsend(s.ep, "sent", 5, NULL, s.peer, 5, &ctx[0]));
		wait_cq(s.cq, &e);
		CHECK(e.op_context == &ctx[0] && (e.flags & FI_SEND));
		ssize_t r;
		while ((r = fi_tinject(s.ep, "inj", 4, s.peer, 6)) == -FI_EAGAIN)
			;
		OK(r);
	}
	char go = 1;
	if (me == 1) {
		/* Both messages arrived: the sender may look at its CQ (this side stays open). */
		put(&go, 1);
		get(&go, 1);
	} else {
		get(&go, 1);
		/* Nothing else was reported (the inject has no completion). */
		CHECK_RC(fi_cq_read(s.cq, &e, 1), -FI_EAGAIN);
		put(&go, 1);
	}
	side_close(&s);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s multi_recv|writedata|keys|fallback|zero_len|op_flags\n", argv[0]);
		return 2;
	}
	const char *s = argv[1];
	if (getenv("VFABRIC_DEVICES"))
		all_devices = strdup(getenv("VFABRIC_DEVICES"));
	if (!strcmp(s, "multi_recv"))
		two_sides(multi_recv_side);
	else if (!strcmp(s, "writedata")) {
		writedata_mode = FI_RX_CQ_DATA;
		two_sides(writedata_side);
		writedata_mode = 0;
		two_sides(writedata_side);
	} else if (!strcmp(s, "keys"))
		two_sides(keys_side);
	else if (!strcmp(s, "fallback"))
		fallback();
	else if (!strcmp(s, "op_flags"))
		two_sides(op_flags_side);
	else if (!strcmp(s, "zero_len"))
		two_sides(zero_len_side);
	else
		return 2;
	printf("%s: ok\n", s);
	return 0;
}
