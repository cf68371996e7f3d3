/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Exercises the vfabric libfabric provider through the plain libfabric 1.17 API, in one
 * process: two endpoints on one device talk to each other. Built and run by
 * tests/provider.rs (gcc ... -lfabric), with FI_PROVIDER_PATH and VFABRIC_DEVICES set.
 *
 *   vf_provider_test <suite>    suite: errors | msg | tagged | cq | av | cm | dgram | waitfd |
 *                               threads | cq_threads | rma | atomic | rma_event (rma, atomic, rma_event:
 *                               two devices)
 *
 * VF_TEST_VALGRIND=1 (set by the memcheck runs of tests/provider.rs): heap buffers registered
 * are page-aligned whole pages. Large local registrations (FI_MR_LOCAL) are shared with the
 * device by moving the pages they span onto a memfd in place (Domain::share_raw), copying the
 * whole pages, so the malloc neighbours of a sub-page buffer are read too, which memcheck
 * reports as invalid reads of freed or unallocated heap. (Regions for remote access are not
 * moved: the device reads and writes exactly their bytes by cross-memory attach.)
 *
 * Exit status 0 on success; a failed check prints file:line and the libfabric error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_atomic.h>
#include <rdma/fi_tagged.h>
#include <rdma/fi_collective.h>

#include "vf_check.h"

/* A heap buffer to register for remote access (see VF_TEST_VALGRIND above). */
static void *reg_alloc(size_t len)
{
	if (getenv("VF_TEST_VALGRIND"))
		return aligned_alloc(4096, (len + 4095) & ~(size_t)4095);
	return malloc(len);
}

static struct fi_info *info;
static struct fid_fabric *fabric;
static struct fid_domain *domain;
static struct fid_av *av;
static struct fid_cq *cq[2];
static struct fid_ep *ep[2];
static fi_addr_t addr[2];
static enum fi_wait_obj cq_wait = FI_WAIT_UNSPEC;

static struct fi_info *get_info(enum fi_ep_type type, uint64_t caps)
{
	struct fi_info *hints = fi_allocinfo(), *out = NULL;
	CHECK(hints);
	hints->ep_attr->type = type;
	hints->caps = caps;
	hints->fabric_attr->prov_name = strdup("vfabric");
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_VIRT_ADDR;
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out));
	fi_freeinfo(hints);
	return out;
}

/* Poll one completion (context format or larger) from `c`; returns the fi_cq_read result. */
static ssize_t poll_cq(struct fid_cq *c, void *entry)
{
	time_t end = time(NULL) + 20;
	for (long i = 0;; i++) {
		ssize_t r = fi_cq_read(c, entry, 1);
		if (r != -FI_EAGAIN)
			return r;
		if (i > 1000)
			usleep(10);
		if ((i & 1023) == 0 && time(NULL) > end)
			return -FI_ETIMEDOUT;
	}
}

static void setup(enum fi_ep_type type, enum fi_cq_format fmt, enum fi_av_type avt)
{
	info = get_info(type, FI_MSG | FI_TAGGED);
	OK(fi_fabric(info->fabric_attr, &fabric, NULL));
	OK(fi_domain(fabric, info, &domain, NULL));
	struct fi_av_attr av_attr = { .type = avt };
	OK(fi_av_open(domain, &av_attr, &av, NULL));
	for (int i = 0; i < 2; i++) {
		struct fi_cq_attr cq_attr = { .format = fmt, .wait_obj = cq_wait, .size = 64 };
		OK(fi_cq_open(domain, &cq_attr, &cq[i], NULL));
		OK(fi_endpoint(domain, info, &ep[i], NULL));
		OK(fi_ep_bind(ep[i], &av->fid, 0));
		OK(fi_ep_bind(ep[i], &cq[i]->fid, FI_TRANSMIT | FI_RECV));
		OK(fi_enable(ep[i]));
	}
	for (int i = 0; i < 2; i++) {
		char name[64];
		size_t len = sizeof(name);
		OK(fi_getname(&ep[i]->fid, name, &len));
		CHECK(len == 16);
		CHECK_RC(fi_av_insert(av, name, 1, &addr[i], 0, NULL), 1);
	}
}

static void teardown(void)
{
	/* A domain with open children refuses to close. */
	CHECK_RC(fi_close(&domain->fid), -FI_EBUSY);
	for (int i = 0; i < 2; i++)
		OK(fi_close(&ep[i]->fid));
	for (int i = 0; i < 2; i++)
		OK(fi_close(&cq[i]->fid));
	OK(fi_close(&av->fid));
	OK(fi_close(&domain->fid));
	OK(fi_close(&fabric->fid));
	fi_freeinfo(info);
}

static void suite_errors(void)
{
	struct fi_info *hints = fi_allocinfo(), *out = NULL;
	hints->fabric_attr->prov_name = strdup("vfabric");
	hints->ep_attr->type = FI_EP_SOCK_STREAM;
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_MSG | FI_COLLECTIVE;
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	hints->caps = FI_MSG;
	hints->addr_format = FI_SOCKADDR_IB;
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	hints->addr_format = FI_FORMAT_UNSPEC;
	hints->domain_attr->name = strdup("no-such-device");
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	free(hints->domain_attr->name);
	hints->domain_attr->name = NULL;
	hints->fabric_attr->name = strdup("not-vfabric");
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	free(hints->fabric_attr->name);
	hints->fabric_attr->name = NULL;
	hints->ep_attr->max_msg_size = (size_t)1 << 60;
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	hints->ep_attr->max_msg_size = 0;
	hints->domain_attr->data_progress = FI_PROGRESS_AUTO;
	CHECK_RC(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out), -FI_ENODATA);
	hints->domain_attr->data_progress = FI_PROGRESS_UNSPEC;
	/* Good hints: no utility provider is stacked on top of us. */
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &out));
	for (struct fi_info *i = out; i; i = i->next) {
		CHECK(strcmp(i->fabric_attr->prov_name, "vfabric") == 0);
		CHECK(i->ep_attr->type == FI_EP_RDM);
		CHECK(i->domain_attr->threading == FI_THREAD_SAFE);
	}
	fi_freeinfo(out);
	fi_freeinfo(hints);

	/* Operations on a disabled endpoint; NULL arguments; unsupported tables. */
	info = get_info(FI_EP_RDM, FI_MSG);
	OK(fi_fabric(info->fabric_attr, &fabric, NULL));
	OK(fi_domain(fabric, info, &domain, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT };
	OK(fi_cq_open(domain, &cq_attr, &cq[0], NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(domain, &av_attr, &av, NULL));
	OK(fi_endpoint(domain, info, &ep[0], NULL));
	char buf[64] = "x";
	CHECK_RC(fi_send(ep[0], buf, 1, NULL, 0, NULL), -FI_EOPBADSTATE);
	CHECK_RC(fi_recv(ep[0], buf, 1, NULL, 0, NULL), -FI_EOPBADSTATE);
	CHECK_RC(fi_getname(&ep[0]->fid, buf, NULL), -FI_EINVAL);
	CHECK_RC(fi_cq_read(cq[0], buf, 1), -FI_EAGAIN);
	CHECK_RC(fi_cq_sread(cq[0], buf, 1, NULL, 10), -FI_ENOSYS); /* FI_WAIT_NONE */
	struct fid_cntr *cntr;
	struct fi_cntr_attr cntr_attr = { .events = FI_CNTR_EVENTS_COMP, .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_cntr_open(domain, &cntr_attr, &cntr, NULL));
	OK(fi_ep_bind(ep[0], &cntr->fid, FI_SEND | FI_RECV));
	struct fid_cq *fdcq;
	struct fi_cq_attr fd_attr = { .format = FI_CQ_FORMAT_CONTEXT, .wait_obj = FI_WAIT_SET };
	CHECK_RC(fi_cq_open(domain, &fd_attr, &fdcq, NULL), -FI_ENOSYS);
	OK(fi_ep_bind(ep[0], &av->fid, 0));
	OK(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT | FI_RECV));
	/* Bound objects refuse to close before the endpoint. */
	CHECK_RC(fi_close(&cq[0]->fid), -FI_EBUSY);
	CHECK_RC(fi_close(&av->fid), -FI_EBUSY);
	OK(fi_enable(ep[0]));
	CHECK_RC(fi_enable(ep[0]), -FI_EOPBADSTATE);
	CHECK_RC(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT), -FI_EOPBADSTATE);
	/* RMA and atomics on an endpoint opened without FI_RMA / FI_ATOMIC. */
	CHECK_RC(fi_write(ep[0], buf, 8, NULL, 0, 0, 0, NULL), -FI_EOPNOTSUPP);
	CHECK_RC(fi_read(ep[0], buf, 8, NULL, 0, 0, 0, NULL), -FI_EOPNOTSUPP);
	CHECK_RC(fi_atomic(ep[0], buf, 1, NULL, 0, 0, 0, FI_UINT64, FI_SUM, NULL), -FI_EOPNOTSUPP);
	CHECK_RC(fi_connect(ep[0], buf, NULL, 0), -FI_EOPNOTSUPP);
	CHECK_RC(fi_barrier(ep[0], 0, NULL), -FI_ENOSYS);
	/* Sending to an fi_addr not in the AV. */
	CHECK(fi_send(ep[0], buf, 1, NULL, 12345, NULL) < 0);
	/* FI_MULTI_RECV needs one contiguous buffer. */
	struct iovec iov[2] = { { buf, 32 }, { buf + 32, 32 } };
	struct fi_msg msg = { .msg_iov = iov, .iov_count = 2, .addr = FI_ADDR_UNSPEC };
	CHECK_RC(fi_recvmsg(ep[0], &msg, FI_MULTI_RECV), -FI_EINVAL);
	/* Inject larger than inject_size. */
	char *big = calloc(1, info->tx_attr->inject_size + 1);
	char name[16];
	size_t nl = sizeof(name);
	OK(fi_getname(&ep[0]->fid, name, &nl));
	fi_addr_t self;
	CHECK_RC(fi_av_insert(av, name, 1, &self, 0, NULL), 1);
	CHECK(fi_inject(ep[0], big, info->tx_attr->inject_size + 1, self) < 0);
	free(big);
	/* getopt / setopt. */
	size_t v = 0, vl = sizeof(v);
	OK(fi_getopt(&ep[0]->fid, FI_OPT_ENDPOINT, FI_OPT_CM_DATA_SIZE, &v, &vl));
	CHECK(v == 256);
	v = 4096;
	OK(fi_setopt(&ep[0]->fid, FI_OPT_ENDPOINT, FI_OPT_MIN_MULTI_RECV, &v, sizeof(v)));
	v = 0;
	vl = sizeof(v);
	OK(fi_getopt(&ep[0]->fid, FI_OPT_ENDPOINT, FI_OPT_MIN_MULTI_RECV, &v, &vl));
	CHECK(v == 4096);
	CHECK_RC(fi_getopt(&ep[0]->fid, FI_OPT_ENDPOINT, 9999, &v, &vl), -FI_ENOPROTOOPT);
	/* Truncation: a 8-byte receive for a 64-byte message. */
	char small[8], data[64];
	memset(data, 0xab, sizeof(data));
	OK(fi_recv(ep[0], small, sizeof(small), NULL, FI_ADDR_UNSPEC, (void *)0x77));
	OK(fi_send(ep[0], data, sizeof(data), NULL, self, (void *)0x78));
	int got_send = 0, got_trunc = 0;
	for (int n = 0; n < 2; n++) {
		struct fi_cq_entry e;
		ssize_t r = poll_cq(cq[0], &e);
		if (r == 1) {
			CHECK(e.op_context == (void *)0x78);
			got_send = 1;
		} else {
			CHECK_RC(r, -FI_EAVAIL);
			struct fi_cq_err_entry err = { 0 };
			CHECK_RC(fi_cq_readerr(cq[0], &err, 0), 1);
			CHECK(err.err == FI_ETRUNC);
			CHECK(err.op_context == (void *)0x77);
			CHECK(err.len == 8 && err.olen == 56);
			const char *s = fi_cq_strerror(cq[0], err.prov_errno, err.err_data, NULL, 0);
			CHECK(s && strstr(s, "TRUNCATED"));
			got_trunc = 1;
		}
	}
	CHECK(got_send && got_trunc);
	/* The counter saw the send complete and the truncated receive fail. */
	CHECK(fi_cntr_read(cntr) == 1);
	CHECK(fi_cntr_readerr(cntr) == 1);
	OK(fi_cntr_set(cntr, 0));
	OK(fi_cntr_add(cntr, 5));
	OK(fi_cntr_wait(cntr, 5, 1000));
	CHECK_RC(fi_cntr_wait(cntr, 10, 20), -FI_ETIMEDOUT);
	OK(fi_cntr_seterr(cntr, 0));
	OK(fi_cntr_adderr(cntr, 2));
	CHECK(fi_cntr_readerr(cntr) == 2);
	CHECK_RC(fi_close(&cntr->fid), -FI_EBUSY);
	/* Cancel of a posted receive: an FI_ECANCELED error entry. */
	OK(fi_recv(ep[0], small, sizeof(small), NULL, FI_ADDR_UNSPEC, (void *)0x79));
	OK(fi_cancel(&ep[0]->fid, (void *)0x79));
	struct fi_cq_entry e;
	CHECK_RC(poll_cq(cq[0], &e), -FI_EAVAIL);
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_readerr(cq[0], &err, 0), 1);
	CHECK(err.err == FI_ECANCELED && err.op_context == (void *)0x79);
	CHECK_RC(fi_cancel(&ep[0]->fid, (void *)0x79), -FI_ENOENT);
	OK(fi_close(&ep[0]->fid));
	OK(fi_close(&cntr->fid));
	OK(fi_close(&cq[0]->fid));
	OK(fi_close(&av->fid));
	OK(fi_close(&domain->fid));
	OK(fi_close(&fabric->fid));
	fi_freeinfo(info);
}

/* Send from ep[0] to ep[1] with the given call; check payload and completions. */
static void suite_msg(void)
{
	setup(FI_EP_RDM, FI_CQ_FORMAT_DATA, FI_AV_TABLE);
	char tx[4096], rx[4096];
	for (size_t i = 0; i < sizeof(tx); i++)
		tx[i] = (char)(i * 7 + 1);
	struct fi_cq_data_entry e;
	/* fi_send / fi_recv, several sizes (inline, bounced, large). */
	size_t sizes[] = { 0, 1, 100, 300, 4096 };
	for (unsigned k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		memset(rx, 0, sizeof(rx));
		OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)1));
		OK(fi_send(ep[0], tx, sizes[k], NULL, addr[1], (void *)2));
		CHECK_RC(poll_cq(cq[0], &e), 1);
		CHECK(e.op_context == (void *)2 && (e.flags & FI_SEND) && (e.flags & FI_MSG));
		CHECK_RC(poll_cq(cq[1], &e), 1);
		CHECK(e.op_context == (void *)1 && (e.flags & FI_RECV) && e.len == sizes[k]);
		CHECK(memcmp(tx, rx, sizes[k]) == 0);
	}
	/* A zero-length receive (NULL or not) takes a zero-length message. */
	for (int k = 0; k < 2; k++) {
		OK(fi_recv(ep[1], k ? (void *)rx : NULL, 0, NULL, FI_ADDR_UNSPEC, (void *)0x20));
		OK(fi_send(ep[0], tx, 0, NULL, addr[1], (void *)0x21));
		CHECK_RC(poll_cq(cq[0], &e), 1);
		CHECK(e.op_context == (void *)0x21);
		CHECK_RC(poll_cq(cq[1], &e), 1);
		CHECK(e.op_context == (void *)0x20 && (e.flags & FI_RECV) && e.len == 0);
	}
	/* fi_sendv / fi_recvv. */
	struct iovec siov[3] = { { tx, 10 }, { tx + 10, 1000 }, { tx + 1010, 90 } };
	struct iovec riov[2] = { { rx, 600 }, { rx + 600, 600 } };
	memset(rx, 0, sizeof(rx));
	OK(fi_recvv(ep[1], riov, NULL, 2, FI_ADDR_UNSPEC, (void *)3));
	OK(fi_sendv(ep[0], siov, NULL, 3, addr[1], (void *)4));
	CHECK_RC(poll_cq(cq[0], &e), 1);
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == 1100 && memcmp(tx, rx, 1100) == 0);
	/* fi_sendmsg with each completion level and remote CQ data; fi_recvmsg. */
	uint64_t levels[] = { FI_INJECT_COMPLETE, FI_TRANSMIT_COMPLETE, FI_DELIVERY_COMPLETE };
	for (int k = 0; k < 3; k++) {
		struct iovec s = { tx, 512 }, r = { rx, sizeof(rx) };
		struct fi_msg sm = { .msg_iov = &s, .iov_count = 1, .addr = addr[1], .context = (void *)5, .data = 0xfeed + k };
		struct fi_msg rm = { .msg_iov = &r, .iov_count = 1, .addr = FI_ADDR_UNSPEC, .context = (void *)6 };
		OK(fi_recvmsg(ep[1], &rm, 0));
		OK(fi_sendmsg(ep[0], &sm, levels[k] | FI_REMOTE_CQ_DATA));
		CHECK_RC(poll_cq(cq[0], &e), 1);
		CHECK(e.op_context == (void *)5);
		CHECK_RC(poll_cq(cq[1], &e), 1);
		CHECK(e.op_context == (void *)6 && e.len == 512);
		CHECK((e.flags & FI_REMOTE_CQ_DATA) && e.data == 0xfeed + (uint64_t)k);
	}
	/* fi_inject / fi_injectdata / fi_senddata: no send completion for injects. */
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)7));
	OK(fi_inject(ep[0], tx, 64, addr[1]));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.op_context == (void *)7 && e.len == 64 && memcmp(tx, rx, 64) == 0);
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)8));
	OK(fi_injectdata(ep[0], tx, 32, 0x1234, addr[1]));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.data == 0x1234 && (e.flags & FI_REMOTE_CQ_DATA));
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)9));
	OK(fi_senddata(ep[0], tx, 32, NULL, 0x5678, addr[1], (void *)10));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.data == 0x5678);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	CHECK(e.op_context == (void *)10);
	CHECK_RC(fi_cq_read(cq[0], &e, 1), -FI_EAGAIN);
	/* fi_sendmsg with FI_INJECT (fi_msg(3)): the buffer is free on return, and the send
	 * completes like any other (only the fi_inject calls never complete). */
	{
		struct iovec s = { tx, 48 };
		struct fi_msg sm = { .msg_iov = &s, .iov_count = 1, .addr = addr[1], .context = (void *)13 };
		OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)14));
		OK(fi_sendmsg(ep[0], &sm, FI_INJECT));
		memset(tx, 0xee, 48); /* the buffer is ours again at once */
		CHECK_RC(poll_cq(cq[1], &e), 1);
		CHECK(e.op_context == (void *)14 && e.len == 48 && rx[0] != (char)0xee);
		CHECK_RC(poll_cq(cq[0], &e), 1);
		CHECK(e.op_context == (void *)13);
		CHECK_RC(fi_cq_read(cq[0], &e, 1), -FI_EAGAIN);
	}
	/* fi_cq_readfrom gives the sender's fi_addr; fi_cq_sread blocks until then. */
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)11));
	OK(fi_send(ep[0], tx, 16, NULL, addr[1], (void *)12));
	fi_addr_t src = 0;
	ssize_t r;
	for (time_t end = time(NULL) + 20; (r = fi_cq_readfrom(cq[1], &e, 1, &src)) == -FI_EAGAIN && time(NULL) < end;)
		;
	CHECK_RC(r, 1);
	CHECK(src == addr[0]);
	CHECK_RC(fi_cq_sread(cq[0], &e, 1, NULL, 5000), 1);
	CHECK_RC(fi_cq_sread(cq[0], &e, 1, NULL, 20), -FI_EAGAIN);
	/* FI_MULTI_RECV (emulated): messages land back to back; the entry that leaves less than
	 * FI_OPT_MIN_MULTI_RECV bytes carries FI_MULTI_RECV. */
	{
		size_t min = 64;
		OK(fi_setopt(&ep[1]->fid, FI_OPT_ENDPOINT, FI_OPT_MIN_MULTI_RECV, &min, sizeof(min)));
		char mbuf[256];
		struct iovec miov = { mbuf, sizeof(mbuf) };
		struct fi_msg mm = { .msg_iov = &miov, .iov_count = 1, .addr = FI_ADDR_UNSPEC, .context = (void *)0x4d };
		OK(fi_recvmsg(ep[1], &mm, FI_MULTI_RECV));
		for (int i = 0; i < 2; i++) {
			memset(tx, 'a' + i, 100);
			OK(fi_send(ep[0], tx, 100, NULL, addr[1], (void *)0x4e));
			CHECK_RC(poll_cq(cq[0], &e), 1);
			CHECK_RC(poll_cq(cq[1], &e), 1);
			CHECK(e.op_context == (void *)0x4d && e.len == 100);
			CHECK(e.buf == mbuf + 100 * i && mbuf[100 * i] == 'a' + i && mbuf[100 * i + 99] == 'a' + i);
			CHECK(!!(e.flags & FI_MULTI_RECV) == (i == 1));
		}
		/* Cancel by the consumer's context releases the buffer. */
		mm.context = (void *)0x4f;
		OK(fi_recvmsg(ep[1], &mm, FI_MULTI_RECV));
		OK(fi_cancel(&ep[1]->fid, (void *)0x4f));
		CHECK_RC(poll_cq(cq[1], &e), -FI_EAVAIL);
		struct fi_cq_err_entry err = { 0 };
		CHECK_RC(fi_cq_readerr(cq[1], &err, 0), 1);
		CHECK(err.err == FI_ECANCELED && err.op_context == (void *)0x4f && (err.flags & FI_MULTI_RECV));
	}
	/* Memory registration in the modes a consumer may require. */
	struct fid_mr *mr;
	OK(fi_mr_reg(domain, tx, sizeof(tx), FI_SEND | FI_RECV, 0, 0xC0DE, 0, &mr, NULL));
	CHECK(fi_mr_desc(mr) != NULL);
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)13));
	OK(fi_send(ep[0], tx, 100, fi_mr_desc(mr), addr[1], (void *)14));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	OK(fi_close(&mr->fid));
	/* Remote access: registered with the device (heap memory), device-chosen key. */
	char *heap = reg_alloc(8192);
	CHECK(heap);
	OK(fi_mr_reg(domain, heap, 8192, FI_REMOTE_WRITE, 0, 0, 0, &mr, NULL));
	CHECK(fi_mr_desc(mr) != NULL);
	OK(fi_close(&mr->fid));
	free(heap);
	/* Large local registrations under FI_MR_LOCAL are shared with the device, so sends and
	 * receives on them skip the bounce buffers; every byte still arrives. */
	CHECK(info->domain_attr->mr_mode & FI_MR_LOCAL);
	{
		const size_t big = 256 * 1024;
		char *sb = reg_alloc(big), *rb = reg_alloc(big);
		CHECK(sb && rb);
		for (size_t i = 0; i < big; i++)
			sb[i] = (char)(i * 7 + 3);
		memset(rb, 0, big);
		struct fid_mr *smr, *rmr;
		OK(fi_mr_reg(domain, sb, big, FI_SEND, 0, 1, 0, &smr, NULL));
		OK(fi_mr_reg(domain, rb, big, FI_RECV, 0, 2, 0, &rmr, NULL));
		for (int k = 0; k < 3; k++) {
			sb[k] = (char)k;
			OK(fi_recv(ep[1], rb, big, fi_mr_desc(rmr), FI_ADDR_UNSPEC, (void *)15));
			OK(fi_send(ep[0], sb, big, fi_mr_desc(smr), addr[1], (void *)16));
			CHECK_RC(poll_cq(cq[1], &e), 1);
			CHECK(e.op_context == (void *)15 && e.len == big);
			CHECK_RC(poll_cq(cq[0], &e), 1);
			CHECK(memcmp(sb, rb, big) == 0);
		}
		OK(fi_close(&smr->fid));
		OK(fi_close(&rmr->fid));
		free(sb);
		free(rb);
	}
	teardown();
}

static void suite_tagged(void)
{
	setup(FI_EP_RDM, FI_CQ_FORMAT_TAGGED, FI_AV_MAP);
	char tx[256], rx[256];
	memset(tx, 0x5a, sizeof(tx));
	struct fi_cq_tagged_entry e;
	/* Tag matching with an ignore mask; the unmatched receive stays posted. */
	OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 0x100, 0, (void *)1));
	OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 0x200, 0xff, (void *)2));
	OK(fi_tsend(ep[0], tx, 10, NULL, addr[1], 0x2ab, (void *)3));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.op_context == (void *)2 && e.tag == 0x2ab && (e.flags & FI_TAGGED) && e.len == 10);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	OK(fi_tinject(ep[0], tx, 20, addr[1], 0x100));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.op_context == (void *)1 && e.tag == 0x100 && e.len == 20);
	/* tsenddata / tinjectdata. */
	OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 7, 0, (void *)4));
	OK(fi_tsenddata(ep[0], tx, 30, NULL, 0xdada, addr[1], 7, (void *)5));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.data == 0xdada && e.tag == 7);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 8, 0, (void *)6));
	OK(fi_tinjectdata(ep[0], tx, 30, 0xbeef, addr[1], 8));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.data == 0xbeef && e.tag == 8);
	/* PEEK: nothing there -> FI_ENOMSG; after a send, PEEK reports it, CLAIM receives it. */
	struct iovec riov = { rx, sizeof(rx) };
	struct fi_msg_tagged pm = { .msg_iov = NULL, .iov_count = 0, .addr = FI_ADDR_UNSPEC, .tag = 9, .ignore = 0, .context = (void *)7 };
	OK(fi_trecvmsg(ep[1], &pm, FI_PEEK));
	CHECK_RC(poll_cq(cq[1], &e), -FI_EAVAIL);
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_readerr(cq[1], &err, 0), 1);
	CHECK(err.err == FI_ENOMSG);
	OK(fi_tsend(ep[0], tx, 40, NULL, addr[1], 9, (void *)8));
	CHECK_RC(poll_cq(cq[0], &e), 1);
	struct fi_context ctx;
	pm.context = &ctx;
	OK(fi_trecvmsg(ep[1], &pm, FI_PEEK | FI_CLAIM));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == 40 && e.tag == 9);
	struct fi_msg_tagged cm = { .msg_iov = &riov, .iov_count = 1, .addr = FI_ADDR_UNSPEC, .tag = 9, .context = &ctx };
	OK(fi_trecvmsg(ep[1], &cm, FI_CLAIM));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == 40 && e.op_context == &ctx);
	/* PEEK | DISCARD (fi_tagged(3)): reported like PEEK, then gone. */
	OK(fi_tsend(ep[0], tx, 33, NULL, addr[1], 13, (void *)13));
	CHECK_RC(poll_cq(cq[0], &e), 1);
	pm.tag = 13;
	pm.context = (void *)14;
	OK(fi_trecvmsg(ep[1], &pm, FI_PEEK | FI_DISCARD));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == 33 && e.tag == 13 && e.op_context == (void *)14);
	OK(fi_trecvmsg(ep[1], &pm, FI_PEEK));
	CHECK_RC(poll_cq(cq[1], &e), -FI_EAVAIL);
	CHECK_RC(fi_cq_readerr(cq[1], &err, 0), 1);
	CHECK(err.err == FI_ENOMSG);
	/* tsendmsg / tsendv / trecvv. */
	struct iovec siov[2] = { { tx, 5 }, { tx + 5, 5 } };
	OK(fi_trecvv(ep[1], &riov, NULL, 1, FI_ADDR_UNSPEC, 11, 0, (void *)9));
	OK(fi_tsendv(ep[0], siov, NULL, 2, addr[1], 11, (void *)10));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == 10);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	struct fi_msg_tagged sm = { .msg_iov = siov, .iov_count = 2, .addr = addr[1], .tag = 12, .context = (void *)11 };
	OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 12, 0, (void *)12));
	OK(fi_tsendmsg(ep[0], &sm, FI_TRANSMIT_COMPLETE));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	CHECK(e.op_context == (void *)11);
	teardown();
}

/* Every CQ format carries the fields it defines. */
static void suite_cq(void)
{
	enum fi_cq_format fmts[] = { FI_CQ_FORMAT_CONTEXT, FI_CQ_FORMAT_MSG, FI_CQ_FORMAT_DATA, FI_CQ_FORMAT_TAGGED, FI_CQ_FORMAT_UNSPEC };
	for (int k = 0; k < 5; k++) {
		setup(FI_EP_RDM, fmts[k], FI_AV_TABLE);
		char tx[64] = "format", rx[64];
		struct fi_cq_tagged_entry e[4];
		memset(e, 0xee, sizeof(e));
		OK(fi_trecv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, 3, 0, (void *)0x10));
		OK(fi_tsenddata(ep[0], tx, 7, NULL, 0x99, addr[1], 3, (void *)0x20));
		CHECK_RC(poll_cq(cq[1], e), 1);
		CHECK(e[0].op_context == (void *)0x10);
		if (fmts[k] == FI_CQ_FORMAT_CONTEXT || fmts[k] == FI_CQ_FORMAT_UNSPEC) {
			/* Only op_context was written: the next entry slot is untouched. */
			CHECK(((struct fi_cq_entry *)e)[1].op_context == (void *)0xeeeeeeeeeeeeeeee);
		}
		if (fmts[k] >= FI_CQ_FORMAT_MSG && fmts[k] != FI_CQ_FORMAT_UNSPEC)
			CHECK(e[0].len == 7 && (e[0].flags & FI_RECV) && (e[0].flags & FI_TAGGED));
		if (fmts[k] >= FI_CQ_FORMAT_DATA && fmts[k] != FI_CQ_FORMAT_UNSPEC)
			CHECK(e[0].data == 0x99);
		if (fmts[k] == FI_CQ_FORMAT_TAGGED)
			CHECK(e[0].tag == 3);
		CHECK_RC(poll_cq(cq[0], e), 1);
		CHECK(e[0].op_context == (void *)0x20);
		/* Batch read of several completions. */
		for (int i = 0; i < 3; i++)
			OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)(long)(0x30 + i)));
		for (int i = 0; i < 3; i++)
			OK(fi_send(ep[0], tx, 8, NULL, addr[1], NULL));
		int got = 0;
		for (time_t end = time(NULL) + 20; got < 3 && time(NULL) < end;) {
			ssize_t r = fi_cq_read(cq[1], e, 4);
			if (r > 0)
				got += (int)r;
			else
				CHECK_RC(r, -FI_EAGAIN);
		}
		CHECK(got == 3);
		for (int i = 0; i < 3; i++)
			CHECK_RC(poll_cq(cq[0], e), 1);
		teardown();
	}
}

static void suite_av(void)
{
	enum fi_av_type types[] = { FI_AV_MAP, FI_AV_TABLE };
	for (int k = 0; k < 2; k++) {
		setup(FI_EP_RDM, FI_CQ_FORMAT_CONTEXT, types[k]);
		char name[16], back[32], str[128];
		size_t len = sizeof(name);
		OK(fi_getname(&ep[1]->fid, name, &len));
		size_t bl = sizeof(back);
		OK(fi_av_lookup(av, addr[1], back, &bl));
		CHECK(bl == 16 && memcmp(name, back, 16) == 0);
		size_t sl = sizeof(str);
		CHECK(fi_av_straddr(av, name, str, &sl) == str);
		CHECK(strncmp(str, "vfab://", 7) == 0 && sl == strlen(str) + 1);
		/* Truncating straddr still reports the length needed. */
		char tiny[4];
		size_t tl = sizeof(tiny);
		fi_av_straddr(av, name, tiny, &tl);
		CHECK(tl == strlen(str) + 1 && tiny[3] == 0);
		/* fi_av_insertsvc with the printable form. */
		fi_addr_t again;
		CHECK_RC(fi_av_insertsvc(av, str, NULL, &again, 0, NULL), 1);
		char rx[8];
		struct fi_cq_entry e;
		OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)1));
		OK(fi_send(ep[0], "hi", 2, NULL, again, (void *)2));
		CHECK_RC(poll_cq(cq[1], &e), 1);
		CHECK_RC(poll_cq(cq[0], &e), 1);
		/* Removal: the index no longer resolves. */
		OK(fi_av_remove(av, &again, 1, 0));
		bl = sizeof(back);
		CHECK_RC(fi_av_lookup(av, again, back, &bl), -FI_ENOENT);
		CHECK(fi_send(ep[0], "hi", 2, NULL, again, (void *)3) < 0);
		/* fi_getname length protocol. */
		len = 0;
		CHECK_RC(fi_getname(&ep[0]->fid, NULL, &len), -FI_ETOOSMALL);
		CHECK(len == 16);
		len = 3;
		CHECK_RC(fi_getname(&ep[0]->fid, name, &len), -FI_ETOOSMALL);
		CHECK(len == 16);
		/* fi_setname: only the address the endpoint has. */
		len = 16;
		OK(fi_getname(&ep[0]->fid, name, &len));
		OK(fi_setname(&ep[0]->fid, name, 16));
		name[8] ^= 1;
		CHECK_RC(fi_setname(&ep[0]->fid, name, 16), -FI_EINVAL);
		/* Bad addresses are not inserted. */
		char junk[16];
		memset(junk, 0, sizeof(junk));
		fi_addr_t fa[2];
		CHECK(fi_av_insert(av, junk, 1, fa, 0, NULL) >= 0);
		teardown();
	}
}

/* FI_EP_MSG: passive endpoint, connect, accept, data, shutdown; then a reject. */
static int eq_wait(struct fid_eq *eq, uint32_t *event, void *buf, size_t len)
{
	ssize_t r = fi_eq_sread(eq, event, buf, len, 5000, 0);
	if (r == -FI_EAVAIL) {
		struct fi_eq_err_entry err = { 0 };
		CHECK_RC(fi_eq_readerr(eq, &err, 0), 1);
		return -err.err;
	}
	CHECK(r > 0);
	return 0;
}

static void suite_cm(void)
{
	struct fi_info *pinfo = get_info(FI_EP_MSG, FI_MSG);
	struct fid_eq *eq;
	struct fid_pep *pep;
	OK(fi_fabric(pinfo->fabric_attr, &fabric, NULL));
	struct fi_eq_attr eq_attr = { .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_eq_open(fabric, &eq_attr, &eq, NULL));
	OK(fi_passive_ep(fabric, pinfo, &pep, NULL));
	OK(fi_pep_bind(pep, &eq->fid, 0));
	OK(fi_listen(pep));
	char pname[16];
	size_t plen = 0;
	CHECK_RC(fi_getname(&pep->fid, pname, &plen), -FI_ETOOSMALL);
	plen = sizeof(pname);
	OK(fi_getname(&pep->fid, pname, &plen));

	/* Client side: endpoint with dest_addr = the pep's name. */
	OK(fi_domain(fabric, pinfo, &domain, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_cq_open(domain, &cq_attr, &cq[0], NULL));
	OK(fi_cq_open(domain, &cq_attr, &cq[1], NULL));
	OK(fi_endpoint(domain, pinfo, &ep[0], (void *)0xc1));
	OK(fi_ep_bind(ep[0], &eq->fid, 0));
	OK(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(ep[0]));
	char tx[64] = "over a connection", rx[64];
	CHECK_RC(fi_send(ep[0], tx, 8, NULL, 0, NULL), -FI_ENOTCONN);
	OK(fi_connect(ep[0], pname, "hello", 6));

	/* Server: FI_CONNREQ with the private data, endpoint from the request info, accept. */
	uint32_t event;
	char evbuf[sizeof(struct fi_eq_cm_entry) + 256];
	struct fi_eq_cm_entry *cm = (void *)evbuf;
	OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
	CHECK(event == FI_CONNREQ && cm->fid == &pep->fid && strcmp((char *)cm->data, "hello") == 0);
	struct fi_info *rinfo = cm->info;
	CHECK(rinfo && rinfo->handle && rinfo->dest_addrlen == 16);
	OK(fi_endpoint(domain, rinfo, &ep[1], (void *)0x51));
	OK(fi_ep_bind(ep[1], &eq->fid, 0));
	OK(fi_ep_bind(ep[1], &cq[1]->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(ep[1]));
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, 0, (void *)1));
	OK(fi_accept(ep[1], "welcome", 8));
	fi_freeinfo(rinfo);
	int connected[2] = { 0, 0 };
	for (int n = 0; n < 2; n++) {
		OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
		CHECK(event == FI_CONNECTED);
		if (cm->fid == &ep[0]->fid) {
			CHECK(strcmp((char *)cm->data, "welcome") == 0);
			connected[0] = 1;
		} else {
			CHECK(cm->fid == &ep[1]->fid);
			connected[1] = 1;
		}
	}
	CHECK(connected[0] && connected[1]);
	char peer[16];
	size_t pl = sizeof(peer);
	OK(fi_getpeer(ep[0], peer, &pl));
	/* Data both ways. */
	struct fi_cq_msg_entry e;
	OK(fi_send(ep[0], tx, sizeof(tx), NULL, 0, (void *)2));
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.len == sizeof(tx) && memcmp(rx, tx, sizeof(tx)) == 0);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	OK(fi_recv(ep[0], rx, sizeof(rx), NULL, 0, (void *)3));
	OK(fi_send(ep[1], "back", 5, NULL, 0, (void *)4));
	CHECK_RC(poll_cq(cq[0], &e), 1);
	CHECK(e.len == 5 && strcmp(rx, "back") == 0);
	CHECK_RC(poll_cq(cq[1], &e), 1);
	/* Shutdown: the peer gets FI_SHUTDOWN. */
	OK(fi_shutdown(ep[0], 0));
	OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
	CHECK(event == FI_SHUTDOWN && ((struct fi_eq_entry *)evbuf)->fid == &ep[1]->fid);
	OK(fi_close(&ep[0]->fid));
	OK(fi_close(&ep[1]->fid));

	/* Reject: the client's EQ reports FI_ECONNREFUSED. */
	OK(fi_endpoint(domain, pinfo, &ep[0], NULL));
	OK(fi_ep_bind(ep[0], &eq->fid, 0));
	OK(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(ep[0]));
	OK(fi_connect(ep[0], pname, NULL, 0));
	OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
	CHECK(event == FI_CONNREQ);
	OK(fi_reject(pep, cm->info->handle, "no", 3));
	fi_freeinfo(cm->info);
	CHECK_RC(eq_wait(eq, &event, evbuf, sizeof(evbuf)), -FI_ECONNREFUSED);
	OK(fi_close(&ep[0]->fid));

	/* EQ write/read of a user event; empty EQ read. */
	struct fi_eq_entry ue = { .fid = &fabric->fid, .context = (void *)9, .data = 42 };
	CHECK_RC(fi_eq_write(eq, FI_NOTIFY, &ue, sizeof(ue), 0), sizeof(ue));
	struct fi_eq_entry got;
	CHECK_RC(fi_eq_read(eq, &event, &got, sizeof(got), 0), sizeof(got));
	CHECK(event == FI_NOTIFY && got.data == 42);
	CHECK_RC(fi_eq_read(eq, &event, &got, sizeof(got), 0), -FI_EAGAIN);
	CHECK(fi_eq_strerror(eq, FI_ECONNREFUSED, NULL, NULL, 0) != NULL);

	CHECK_RC(fi_close(&eq->fid), -FI_EBUSY); /* the pep is bound to it */
	OK(fi_close(&pep->fid));
	OK(fi_close(&cq[0]->fid));
	OK(fi_close(&cq[1]->fid));
	OK(fi_close(&domain->fid));
	OK(fi_close(&eq->fid));
	OK(fi_close(&fabric->fid));
	fi_freeinfo(pinfo);
}

/* DGRAM endpoints: send/recv (unreliable: a datagram that reaches the device before the
 * receive is dropped, so resend until one lands) and the DELIVERY_COMPLETE restriction. */
static void suite_dgram(void)
{
	setup(FI_EP_DGRAM, FI_CQ_FORMAT_MSG, FI_AV_TABLE);
	char tx[100], rx[100];
	memset(tx, 3, sizeof(tx));
	struct fi_cq_msg_entry e;
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)1));
	int received = 0;
	for (int attempt = 0; attempt < 200 && !received; attempt++) {
		OK(fi_send(ep[0], tx, sizeof(tx), NULL, addr[1], (void *)2));
		CHECK_RC(poll_cq(cq[0], &e), 1);
		CHECK(e.op_context == (void *)2);
		for (int i = 0; i < 100 && !received; i++) {
			ssize_t r = fi_cq_read(cq[1], &e, 1);
			if (r == 1)
				received = 1;
			else
				CHECK_RC(r, -FI_EAGAIN);
			usleep(100);
		}
	}
	CHECK(received);
	CHECK(e.op_context == (void *)1 && e.len == sizeof(tx) && memcmp(tx, rx, sizeof(tx)) == 0);
	struct iovec s = { tx, 10 };
	struct fi_msg sm = { .msg_iov = &s, .iov_count = 1, .addr = addr[1] };
	CHECK(fi_sendmsg(ep[0], &sm, FI_DELIVERY_COMPLETE) < 0);
	teardown();
}

/* FI_WAIT_FD: fi_control(FI_GETWAIT) gives an fd that poll(2) reports readable when a
 * completion arrives; fi_trywait tells whether it is safe to sleep. */
static void suite_waitfd(void)
{
	cq_wait = FI_WAIT_FD;
	setup(FI_EP_RDM, FI_CQ_FORMAT_CONTEXT, FI_AV_TABLE);
	int fd = -1;
	OK(fi_control(&cq[1]->fid, FI_GETWAIT, &fd));
	CHECK(fd >= 0);
	struct fid *fids[1] = { &cq[1]->fid };
	OK(fi_trywait(fabric, fids, 1));
	struct pollfd p = { .fd = fd, .events = POLLIN };
	CHECK(poll(&p, 1, 0) == 0);
	char rx[16];
	struct fi_cq_entry e;
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)1));
	OK(fi_send(ep[0], "wake", 5, NULL, addr[1], (void *)2));
	/* Nobody reads cq[1]: the provider's progress makes the fd fire. */
	CHECK(poll(&p, 1, 5000) == 1 && (p.revents & POLLIN));
	CHECK_RC(fi_trywait(fabric, fids, 1), -FI_EAGAIN);
	CHECK_RC(fi_cq_read(cq[1], &e, 1), 1);
	CHECK(e.op_context == (void *)1 && strcmp(rx, "wake") == 0);
	CHECK(poll(&p, 1, 0) == 0);
	OK(fi_trywait(fabric, fids, 1));
	CHECK_RC(fi_cq_sread(cq[0], &e, 1, NULL, 5000), 1);
	teardown();
}

/* FI_THREAD_SAFE: threads share the domain and AV, each with its own endpoints and CQs, and
 * one CQ shared by all threads' senders. */
#define NTHREADS 4
#define NMSGS 500
static struct fid_cq *shared_tx_cq;

static void *thread_main(void *arg)
{
	long t = (long)arg;
	struct fid_cq *rcq;
	struct fid_ep *s, *r;
	struct fi_cq_attr attr = { .format = FI_CQ_FORMAT_DATA };
	OK(fi_cq_open(domain, &attr, &rcq, NULL));
	OK(fi_endpoint(domain, info, &s, NULL));
	OK(fi_endpoint(domain, info, &r, NULL));
	OK(fi_ep_bind(s, &av->fid, 0));
	OK(fi_ep_bind(r, &av->fid, 0));
	OK(fi_ep_bind(s, &shared_tx_cq->fid, FI_TRANSMIT));
	OK(fi_ep_bind(s, &rcq->fid, FI_RECV));
	OK(fi_ep_bind(r, &rcq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(s));
	OK(fi_enable(r));
	char name[16];
	size_t len = sizeof(name);
	OK(fi_getname(&r->fid, name, &len));
	fi_addr_t dst;
	CHECK_RC(fi_av_insert(av, name, 1, &dst, 0, NULL), 1);
	for (int i = 0; i < NMSGS; i++) {
		uint64_t rx = 0, tx = ((uint64_t)t << 32) | (uint64_t)i;
		OK(fi_recv(r, &rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)(t + 1)));
		ssize_t rc;
		while ((rc = fi_send(s, &tx, sizeof(tx), NULL, dst, (void *)(t + 100))) == -FI_EAGAIN)
			;
		OK(rc);
		struct fi_cq_data_entry e;
		CHECK_RC(poll_cq(rcq, &e), 1);
		CHECK(e.op_context == (void *)(t + 1) && rx == tx);
		/* Reap send completions of any thread from the shared CQ (counted globally). */
		fi_cq_read(shared_tx_cq, &e, 1);
	}
	OK(fi_close(&s->fid));
	OK(fi_close(&r->fid));
	OK(fi_close(&rcq->fid));
	return NULL;
}

static void suite_threads(void)
{
	info = get_info(FI_EP_RDM, FI_MSG);
	CHECK(info->domain_attr->threading == FI_THREAD_SAFE);
	OK(fi_fabric(info->fabric_attr, &fabric, NULL));
	OK(fi_domain(fabric, info, &domain, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(domain, &av_attr, &av, NULL));
	struct fi_cq_attr attr = { .format = FI_CQ_FORMAT_CONTEXT, .size = NTHREADS * NMSGS };
	OK(fi_cq_open(domain, &attr, &shared_tx_cq, NULL));
	pthread_t th[NTHREADS];
	for (long t = 0; t < NTHREADS; t++)
		CHECK(pthread_create(&th[t], NULL, thread_main, (void *)t) == 0);
	for (int t = 0; t < NTHREADS; t++)
		CHECK(pthread_join(th[t], NULL) == 0);
	OK(fi_close(&shared_tx_cq->fid));
	OK(fi_close(&av->fid));
	OK(fi_close(&domain->fid));
	OK(fi_close(&fabric->fid));
	fi_freeinfo(info);
}

/* FI_THREAD_SAFE: a thread blocked in fi_cq_sread must not block another thread's
 * non-blocking fi_cq_read of the same CQ. The sleeper waits up to 10 s; the reader reads while
 * it sleeps, then sends the message that wakes it. */
static volatile int sleeper_started, sleeper_done;
static ssize_t sleeper_rc;

static void *sread_sleeper(void *arg)
{
	struct fi_cq_data_entry *e = arg;
	__atomic_store_n(&sleeper_started, 1, __ATOMIC_SEQ_CST);
	sleeper_rc = fi_cq_sread(cq[1], e, 1, NULL, 10000);
	__atomic_store_n(&sleeper_done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static void suite_cq_threads(void)
{
	setup(FI_EP_RDM, FI_CQ_FORMAT_DATA, FI_AV_TABLE);
	CHECK(info->domain_attr->threading == FI_THREAD_SAFE);
	char rx[16];
	struct fi_cq_data_entry se, e;
	OK(fi_recv(ep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)0x40));
	pthread_t th;
	CHECK(pthread_create(&th, NULL, sread_sleeper, &se) == 0);
	while (!__atomic_load_n(&sleeper_started, __ATOMIC_SEQ_CST))
		usleep(1000);
	usleep(300 * 1000); /* let it reach its sleep */
	CHECK_RC(fi_cq_read(cq[1], &e, 1), -FI_EAGAIN);
	/* The read returned while the sleeper still waits (no completion exists yet). */
	CHECK(!__atomic_load_n(&sleeper_done, __ATOMIC_SEQ_CST));
	OK(fi_send(ep[0], "wake", 5, NULL, addr[1], (void *)0x41));
	CHECK(pthread_join(th, NULL) == 0);
	CHECK_RC(sleeper_rc, 1);
	CHECK(se.op_context == (void *)0x40 && strcmp(rx, "wake") == 0);
	CHECK_RC(poll_cq(cq[0], &e), 1);
	teardown();
}

/* RMA/atomic rig: one endpoint on each of two devices (domains). rep[0] initiates; raddr[0]
 * is rep[1]'s address in rav[0]. */
static struct fi_info *rinfo;
static struct fid_fabric *rfab[2];
static struct fid_domain *rdom[2];
static struct fid_av *rav[2];
static struct fid_cq *rcq[2];
static struct fid_ep *rep[2];
static fi_addr_t raddr[2];
/* Capabilities asked for in addition to FI_MSG | FI_RMA | FI_ATOMIC (the rma_event suite). */
static uint64_t rma_extra_caps;

static void rma_setup(void)
{
	struct fi_info *hints = fi_allocinfo();
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_MSG | FI_RMA | FI_ATOMIC | rma_extra_caps;
	/* fi_writedata's notification takes a posted receive at the target. */
	hints->mode = FI_RX_CQ_DATA;
	hints->fabric_attr->prov_name = strdup("vfabric");
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_VIRT_ADDR;
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &rinfo));
	fi_freeinfo(hints);
	struct fi_info *di[2] = { rinfo, NULL };
	for (struct fi_info *i = rinfo->next; i; i = i->next)
		if (strcmp(i->domain_attr->name, rinfo->domain_attr->name) != 0) {
			di[1] = i;
			break;
		}
	CHECK(di[1]);
	for (int k = 0; k < 2; k++) {
		uint64_t want = FI_RMA | FI_ATOMIC | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE | rma_extra_caps;
		CHECK((di[k]->caps & want) == want);
		CHECK(di[k]->domain_attr->mr_mode == (FI_MR_LOCAL | FI_MR_PROV_KEY | FI_MR_VIRT_ADDR));
		OK(fi_fabric(di[k]->fabric_attr, &rfab[k], NULL));
		OK(fi_domain(rfab[k], di[k], &rdom[k], NULL));
		struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
		OK(fi_av_open(rdom[k], &av_attr, &rav[k], NULL));
		struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_DATA, .size = 64 };
		OK(fi_cq_open(rdom[k], &cq_attr, &rcq[k], NULL));
		OK(fi_endpoint(rdom[k], di[k], &rep[k], NULL));
		OK(fi_ep_bind(rep[k], &rav[k]->fid, 0));
		OK(fi_ep_bind(rep[k], &rcq[k]->fid, FI_TRANSMIT | FI_RECV));
		OK(fi_enable(rep[k]));
	}
	for (int k = 0; k < 2; k++) {
		char name[64];
		size_t len = sizeof(name);
		OK(fi_getname(&rep[1 - k]->fid, name, &len));
		CHECK_RC(fi_av_insert(rav[k], name, 1, &raddr[k], 0, NULL), 1);
	}
}

static void rma_teardown(void)
{
	for (int k = 0; k < 2; k++) {
		OK(fi_close(&rep[k]->fid));
		OK(fi_close(&rcq[k]->fid));
		OK(fi_close(&rav[k]->fid));
		OK(fi_close(&rdom[k]->fid));
		OK(fi_close(&rfab[k]->fid));
	}
	fi_freeinfo(rinfo);
}

/* One completion on the initiator's CQ with `ctx`. */
static void rma_done(void *ctx, uint64_t flags)
{
	struct fi_cq_data_entry e;
	CHECK_RC(poll_cq(rcq[0], &e), 1);
	CHECK(e.op_context == ctx);
	CHECK((e.flags & flags) == flags);
}

static void suite_rma(void)
{
	rma_setup();
	const size_t tlen = 1 << 20;
	char *tgt = reg_alloc(tlen), *src = malloc(tlen), *dst = malloc(tlen);
	CHECK(tgt && src && dst);
	memset(tgt, 0, tlen);
	struct fid_mr *mr, *ro;
	OK(fi_mr_reg(rdom[1], tgt, tlen, FI_REMOTE_READ | FI_REMOTE_WRITE, 0, 0, 0, &mr, NULL));
	uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)tgt;
	CHECK(key != FI_KEY_NOTAVAIL);
	/* fi_write / fi_read of several sizes, into and out of malloc'd memory. */
	size_t sizes[] = { 1, 7, 100, 300, 4096, 65536, 300000 };
	for (unsigned k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		size_t n = sizes[k], off = 4096 * k + k;
		if (n > rinfo->ep_attr->max_msg_size)
			continue;
		CHECK(off + n <= tlen);
		for (size_t i = 0; i < n; i++)
			src[i] = (char)(i * 13 + k + 1);
		OK(fi_write(rep[0], src, n, NULL, raddr[0], base + off, key, (void *)(uintptr_t)(100 + k)));
		rma_done((void *)(uintptr_t)(100 + k), FI_RMA | FI_WRITE);
		CHECK(memcmp(tgt + off, src, n) == 0);
		memset(dst, 0, n);
		OK(fi_read(rep[0], dst, n, NULL, raddr[0], base + off, key, (void *)(uintptr_t)(200 + k)));
		rma_done((void *)(uintptr_t)(200 + k), FI_RMA | FI_READ);
		CHECK(memcmp(dst, src, n) == 0);
	}
	/* Vector forms and the msg form. */
	struct iovec iov[2] = { { src, 10 }, { src + 100, 20 } };
	OK(fi_writev(rep[0], iov, NULL, 2, raddr[0], base + 8000, key, (void *)1));
	rma_done((void *)1, FI_RMA | FI_WRITE);
	CHECK(memcmp(tgt + 8000, src, 10) == 0 && memcmp(tgt + 8010, src + 100, 20) == 0);
	struct iovec riov = { dst, 30 };
	struct fi_rma_iov rrma = { base + 8000, 30, key };
	struct fi_msg_rma rm = { .msg_iov = &riov, .iov_count = 1, .addr = raddr[0], .rma_iov = &rrma, .rma_iov_count = 1, .context = (void *)2 };
	memset(dst, 0, 30);
	OK(fi_readmsg(rep[0], &rm, FI_COMPLETION));
	rma_done((void *)2, FI_RMA | FI_READ);
	CHECK(memcmp(dst, tgt + 8000, 30) == 0);
	/* fi_inject_write: no completion; visible after a later write completes. */
	OK(fi_inject_write(rep[0], "inject", 6, raddr[0], base + 9000, key));
	OK(fi_write(rep[0], src, 1, NULL, raddr[0], base + 9100, key, (void *)3));
	rma_done((void *)3, FI_RMA | FI_WRITE);
	for (time_t end = time(NULL) + 10; memcmp(tgt + 9000, "inject", 6) != 0 && time(NULL) < end;)
		usleep(100);
	CHECK(memcmp(tgt + 9000, "inject", 6) == 0);
	/* fi_writedata: the data arrives in the target's receive CQ. */
	char rx[64];
	OK(fi_recv(rep[1], rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)4));
	OK(fi_writedata(rep[0], "hello", 5, NULL, 0xfeedbeef, raddr[0], base + 10000, key, (void *)5));
	rma_done((void *)5, FI_RMA | FI_WRITE);
	struct fi_cq_data_entry e;
	CHECK_RC(poll_cq(rcq[1], &e), 1);
	CHECK(e.op_context == (void *)4 && e.data == 0xfeedbeef);
	CHECK((e.flags & (FI_REMOTE_CQ_DATA | FI_RMA | FI_REMOTE_WRITE)) == (FI_REMOTE_CQ_DATA | FI_RMA | FI_REMOTE_WRITE));
	CHECK(memcmp(tgt + 10000, "hello", 5) == 0);
	/* A region without FI_REMOTE_WRITE refuses writes: -FI_EACCES at the initiator. */
	char *rbuf = reg_alloc(4096);
	CHECK(rbuf);
	memset(rbuf, 'r', 4096);
	OK(fi_mr_reg(rdom[1], rbuf, 4096, FI_REMOTE_READ, 0, 0, 0, &ro, NULL));
	CHECK(fi_mr_key(ro) != key);
	OK(fi_write(rep[0], src, 16, NULL, raddr[0], (uint64_t)(uintptr_t)rbuf, fi_mr_key(ro), (void *)6));
	CHECK_RC(poll_cq(rcq[0], &e), -FI_EAVAIL);
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_readerr(rcq[0], &err, 0), 1);
	CHECK(err.err == FI_EACCES && err.op_context == (void *)6);
	CHECK(rbuf[0] == 'r' && rbuf[15] == 'r');
	/* ... but reads are allowed. */
	memset(dst, 0, 16);
	OK(fi_read(rep[0], dst, 16, NULL, raddr[0], (uint64_t)(uintptr_t)rbuf, fi_mr_key(ro), (void *)7));
	rma_done((void *)7, FI_RMA | FI_READ);
	CHECK(dst[0] == 'r' && dst[15] == 'r');
	OK(fi_close(&ro->fid));
	OK(fi_close(&mr->fid));
	free(rbuf);
	free(tgt);
	free(src);
	free(dst);
	rma_teardown();
}

/* FI_RMA_EVENT: a counter bound to the target's region counts remote writes (fi_mr_bind). */
static void suite_rma_event(void)
{
	rma_extra_caps = FI_RMA_EVENT;
	rma_setup();
	const size_t tlen = 4096;
	char *tgt = reg_alloc(tlen), *loc = malloc(tlen);
	CHECK(tgt && loc);
	memset(tgt, 0, tlen);
	struct fid_mr *mr, *lmr;
	OK(fi_mr_reg(rdom[1], tgt, tlen, FI_REMOTE_READ | FI_REMOTE_WRITE, 0, 0, FI_RMA_EVENT, &mr, NULL));
	uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)tgt;
	struct fi_cntr_attr ca = { .events = FI_CNTR_EVENTS_COMP, .wait_obj = FI_WAIT_UNSPEC };
	struct fid_cntr *cntr;
	OK(fi_cntr_open(rdom[1], &ca, &cntr, NULL));
	/* Bad arguments: a CQ is no counter, unknown flags, a local-only region. */
	CHECK_RC(fi_mr_bind(mr, &rcq[1]->fid, FI_REMOTE_WRITE), -FI_EINVAL);
	CHECK(fi_mr_bind(mr, &cntr->fid, FI_SEND) < 0);
	OK(fi_mr_reg(rdom[1], loc, tlen, FI_READ | FI_WRITE, 0, 0, 0, &lmr, NULL));
	CHECK(fi_mr_bind(lmr, &cntr->fid, FI_REMOTE_WRITE) < 0);
	OK(fi_close(&lmr->fid));
	OK(fi_mr_bind(mr, &cntr->fid, FI_REMOTE_WRITE));
	OK(fi_mr_enable(mr));
	CHECK(fi_cntr_read(cntr) == 0);
	for (int k = 0; k < 3; k++) {
		char b[8];
		memset(b, 'a' + k, sizeof(b));
		OK(fi_write(rep[0], b, sizeof(b), NULL, raddr[0], base + 64 * k, key, (void *)(uintptr_t)(10 + k)));
		rma_done((void *)(uintptr_t)(10 + k), FI_RMA | FI_WRITE);
	}
	/* The target drives its progress through the counter. */
	OK(fi_cntr_wait(cntr, 3, 10000));
	CHECK(fi_cntr_read(cntr) == 3);
	CHECK(fi_cntr_readerr(cntr) == 0);
	CHECK(tgt[0] == 'a' && tgt[64] == 'b' && tgt[128] == 'c');
	/* A bound counter stays open until its region closes. */
	CHECK_RC(fi_close(&cntr->fid), -FI_EBUSY);
	OK(fi_close(&mr->fid));
	OK(fi_close(&cntr->fid));
	free(tgt);
	free(loc);
	rma_teardown();
	rma_extra_caps = 0;
}

static void suite_atomic(void)
{
	rma_setup();
	uint64_t *t = malloc(4096);
	CHECK(t);
	memset(t, 0, 4096);
	struct fid_mr *mr;
	OK(fi_mr_reg(rdom[1], t, 4096, FI_REMOTE_READ | FI_REMOTE_WRITE, 0, 0, 0, &mr, NULL));
	uint64_t key = fi_mr_key(mr), base = (uint64_t)(uintptr_t)t;
	size_t count = 0;
	OK(fi_atomicvalid(rep[0], FI_UINT64, FI_SUM, &count));
	CHECK(count >= 1);
	count = 0;
	OK(fi_fetch_atomicvalid(rep[0], FI_UINT64, FI_SUM, &count));
	CHECK(count >= 1);
	count = 0;
	OK(fi_compare_atomicvalid(rep[0], FI_UINT64, FI_CSWAP, &count));
	CHECK(count >= 1);
	CHECK(fi_compare_atomicvalid(rep[0], FI_UINT64, FI_SUM, &count) < 0);
	CHECK(fi_atomicvalid(rep[0], FI_DOUBLE, FI_BOR, &count) < 0);
	CHECK_RC(fi_atomicvalid(rep[0], FI_UINT64, FI_SUM, NULL), -FI_EINVAL);
	/* fi_fetch_atomic FI_SUM on a uint64. */
	t[0] = 40;
	uint64_t op = 2, res = 0, cmp;
	OK(fi_fetch_atomic(rep[0], &op, 1, NULL, &res, NULL, raddr[0], base, key, FI_UINT64, FI_SUM, (void *)1));
	rma_done((void *)1, FI_ATOMIC | FI_READ);
	CHECK(res == 40 && t[0] == 42);
	/* fi_atomic (no fetch). */
	op = 8;
	OK(fi_atomic(rep[0], &op, 1, NULL, raddr[0], base, key, FI_UINT64, FI_SUM, (void *)2));
	rma_done((void *)2, FI_ATOMIC | FI_WRITE);
	CHECK(t[0] == 50);
	/* fi_compare_atomic FI_CSWAP: a match swaps, a mismatch leaves the value. */
	op = 7;
	cmp = 50;
	res = 0;
	OK(fi_compare_atomic(rep[0], &op, 1, NULL, &cmp, NULL, &res, NULL, raddr[0], base, key, FI_UINT64, FI_CSWAP, (void *)3));
	rma_done((void *)3, FI_ATOMIC);
	CHECK(res == 50 && t[0] == 7);
	op = 99;
	cmp = 1;
	OK(fi_compare_atomic(rep[0], &op, 1, NULL, &cmp, NULL, &res, NULL, raddr[0], base, key, FI_UINT64, FI_CSWAP, (void *)4));
	rma_done((void *)4, FI_ATOMIC);
	CHECK(res == 7 && t[0] == 7);
	/* Several elements through the msg form. */
	uint64_t ops[4] = { 1, 2, 3, 4 }, out[4] = { 0 };
	t[8] = 10, t[9] = 20, t[10] = 30, t[11] = 40;
	struct fi_ioc ioc = { ops, 4 }, rioc = { out, 4 };
	struct fi_rma_ioc rma = { base + 64, 4, key };
	struct fi_msg_atomic m = { .msg_iov = &ioc, .iov_count = 1, .addr = raddr[0], .rma_iov = &rma, .rma_iov_count = 1, .datatype = FI_UINT64, .op = FI_SUM, .context = (void *)5 };
	OK(fi_fetch_atomicmsg(rep[0], &m, &rioc, NULL, 1, FI_COMPLETION));
	rma_done((void *)5, FI_ATOMIC);
	CHECK(out[0] == 10 && out[3] == 40 && t[8] == 11 && t[11] == 44);
	/* FI_ATOMIC_READ ignores the operand buffer. */
	res = 0;
	OK(fi_fetch_atomic(rep[0], &op, 1, NULL, &res, NULL, raddr[0], base + 72, key, FI_UINT64, FI_ATOMIC_READ, (void *)6));
	rma_done((void *)6, FI_ATOMIC | FI_READ);
	CHECK(res == 22 && t[9] == 22);
	OK(fi_close(&mr->fid));
	rma_teardown();
}

/* Two processes (tests/provider.rs runs both): the server accepts the client, which then dies
 * without fi_shutdown/fi_close (_exit). The server's EQ reports FI_SHUTDOWN and its posted
 * receive completes FI_EHOSTUNREACH (PEER_GONE). The pep's name travels in $VF_PEP_FILE. */
static void suite_cm_peer_death_server(void)
{
	const char *path = getenv("VF_PEP_FILE");
	CHECK(path);
	struct fi_info *pinfo = get_info(FI_EP_MSG, FI_MSG);
	struct fid_eq *eq;
	struct fid_pep *pep;
	OK(fi_fabric(pinfo->fabric_attr, &fabric, NULL));
	struct fi_eq_attr eq_attr = { .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_eq_open(fabric, &eq_attr, &eq, NULL));
	OK(fi_passive_ep(fabric, pinfo, &pep, NULL));
	OK(fi_pep_bind(pep, &eq->fid, 0));
	OK(fi_listen(pep));
	char pname[16];
	size_t plen = sizeof(pname);
	OK(fi_getname(&pep->fid, pname, &plen));
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "wb");
	CHECK(f && fwrite(pname, 1, plen, f) == plen && fclose(f) == 0);
	CHECK(rename(tmp, path) == 0);
	uint32_t event;
	char evbuf[sizeof(struct fi_eq_cm_entry) + 256];
	struct fi_eq_cm_entry *cm = (void *)evbuf;
	/* The client takes a while to start: wait for its request up to 30 s. */
	ssize_t r = fi_eq_sread(eq, &event, evbuf, sizeof(evbuf), 30000, 0);
	CHECK(r > 0 && event == FI_CONNREQ);
	OK(fi_domain(fabric, cm->info, &domain, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_cq_open(domain, &cq_attr, &cq[0], NULL));
	OK(fi_endpoint(domain, cm->info, &ep[0], NULL));
	fi_freeinfo(cm->info);
	OK(fi_ep_bind(ep[0], &eq->fid, 0));
	OK(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(ep[0]));
	OK(fi_accept(ep[0], NULL, 0));
	OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
	CHECK(event == FI_CONNECTED);
	char rx[64];
	OK(fi_recv(ep[0], rx, sizeof(rx), NULL, 0, (void *)7));
	/* The client dies: FI_SHUTDOWN although it never sent SHUTDOWN. */
	r = fi_eq_sread(eq, &event, evbuf, sizeof(evbuf), 30000, 0);
	CHECK(r > 0 && event == FI_SHUTDOWN && ((struct fi_eq_entry *)evbuf)->fid == &ep[0]->fid);
	struct fi_cq_msg_entry e;
	CHECK_RC(fi_cq_sread(cq[0], &e, 1, NULL, 5000), -FI_EAVAIL);
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_readerr(cq[0], &err, 0), 1);
	CHECK(err.op_context == (void *)7 && err.err == FI_EHOSTUNREACH);
	OK(fi_close(&ep[0]->fid));
	OK(fi_close(&pep->fid));
	OK(fi_close(&cq[0]->fid));
	OK(fi_close(&domain->fid));
	OK(fi_close(&eq->fid));
	OK(fi_close(&fabric->fid));
	fi_freeinfo(pinfo);
}

static void suite_cm_peer_death_client(void)
{
	const char *path = getenv("VF_PEP_FILE");
	CHECK(path);
	char pname[16];
	FILE *f = fopen(path, "rb");
	CHECK(f && fread(pname, 1, sizeof(pname), f) == sizeof(pname));
	fclose(f);
	struct fi_info *pinfo = get_info(FI_EP_MSG, FI_MSG);
	struct fid_eq *eq;
	OK(fi_fabric(pinfo->fabric_attr, &fabric, NULL));
	struct fi_eq_attr eq_attr = { .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_eq_open(fabric, &eq_attr, &eq, NULL));
	OK(fi_domain(fabric, pinfo, &domain, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_cq_open(domain, &cq_attr, &cq[0], NULL));
	OK(fi_endpoint(domain, pinfo, &ep[0], NULL));
	OK(fi_ep_bind(ep[0], &eq->fid, 0));
	OK(fi_ep_bind(ep[0], &cq[0]->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(ep[0]));
	OK(fi_connect(ep[0], pname, NULL, 0));
	uint32_t event;
	char evbuf[sizeof(struct fi_eq_cm_entry) + 256];
	OK(eq_wait(eq, &event, evbuf, sizeof(evbuf)));
	CHECK(event == FI_CONNECTED);
	printf("cm_peer_death_client: ok\n");
	fflush(stdout);
	_exit(0); /* no fi_shutdown, no fi_close: as if killed */
}

/* Two devices: domain 0's AV names two endpoints of a child process on domain 1. The child
 * closes the first in order (fi_close: no error, as a connection shut down in order is none),
 * then dies (SIGKILL) with the second open. Every CQ of domain 0 reports the lost peer once as
 * an error entry with no op_context (err FI_EHOSTUNREACH, prov_errno PEER_GONE = 10) — to a
 * consumer blocked in fi_cq_sread and to one sleeping in poll(2) on a FI_WAIT_FD CQ — while the
 * FI_ADDR_UNSPEC receive stays posted. */
static void check_peer_gone(struct fid_cq *c)
{
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_readerr(c, &err, 0), 1);
	CHECK(err.op_context == NULL && err.err == FI_EHOSTUNREACH && err.prov_errno == 10);
	struct fi_cq_entry e;
	CHECK_RC(fi_cq_read(c, &e, 1), -FI_EAGAIN);
}

/* Open fabric, domain, AV, CQ and an enabled endpoint of `info`. */
static void peer_gone_open(struct fi_info *info, struct fid_fabric **fab, struct fid_domain **dom,
			   struct fid_av **av, struct fid_cq **cq, struct fid_ep **ep, int neps)
{
	OK(fi_fabric(info->fabric_attr, fab, NULL));
	OK(fi_domain(*fab, info, dom, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(*dom, &av_attr, av, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT, .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_cq_open(*dom, &cq_attr, cq, NULL));
	for (int k = 0; k < neps; k++) {
		OK(fi_endpoint(*dom, info, &ep[k], NULL));
		OK(fi_ep_bind(ep[k], &(*av)->fid, 0));
		OK(fi_ep_bind(ep[k], &(*cq)->fid, FI_TRANSMIT | FI_RECV));
		OK(fi_enable(ep[k]));
	}
}

/* The child: two endpoints on `info`'s device, their names to the parent, the first closed in
 * order when the parent says so, then wait to be killed. */
static void peer_gone_child(struct fi_info *info, int to_parent, int to_child)
{
	struct fid_fabric *fab;
	struct fid_domain *dom;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep[2];
	peer_gone_open(info, &fab, &dom, &av, &cq, ep, 2);
	char names[2][16];
	for (int k = 0; k < 2; k++) {
		size_t len = sizeof(names[k]);
		OK(fi_getname(&ep[k]->fid, names[k], &len));
		CHECK(len == sizeof(names[k]));
	}
	CHECK(write(to_parent, names, sizeof(names)) == (ssize_t)sizeof(names));
	char c;
	CHECK(read(to_child, &c, 1) == 1);
	OK(fi_close(&ep[0]->fid));
	CHECK(write(to_parent, "c", 1) == 1);
	for (;;)
		pause();
}

static void suite_peer_gone(void)
{
	struct fi_info *hints = fi_allocinfo();
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_MSG;
	hints->fabric_attr->prov_name = strdup("vfabric");
	struct fi_info *list;
	OK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &list));
	fi_freeinfo(hints);
	struct fi_info *di[2] = { list, NULL };
	for (struct fi_info *i = list->next; i; i = i->next)
		if (strcmp(i->domain_attr->name, list->domain_attr->name) != 0) {
			di[1] = i;
			break;
		}
	CHECK(di[1]);
	int to_parent[2], to_child[2];
	CHECK(pipe(to_parent) == 0 && pipe(to_child) == 0);
	pid_t child = fork();
	CHECK(child >= 0);
	if (child == 0) {
		/* A parent that fails a check exits: the child must not outlive it (it would keep
		 * the harness's output pipe open). */
		CHECK(prctl(PR_SET_PDEATHSIG, SIGKILL) == 0);
		if (getppid() == 1)
			_exit(1);
		peer_gone_child(di[1], to_parent[1], to_child[0]);
	}
	struct fid_fabric *fab;
	struct fid_domain *dom;
	struct fid_av *pav;
	struct fid_cq *pcq, *fdcq;
	struct fid_ep *pep;
	peer_gone_open(di[0], &fab, &dom, &pav, &pcq, &pep, 1);
	struct fi_cq_attr fd_attr = { .format = FI_CQ_FORMAT_CONTEXT, .wait_obj = FI_WAIT_FD };
	OK(fi_cq_open(dom, &fd_attr, &fdcq, NULL));
	int fd = -1;
	OK(fi_control(&fdcq->fid, FI_GETWAIT, &fd));
	char names[2][16];
	CHECK(read(to_parent[0], names, sizeof(names)) == (ssize_t)sizeof(names));
	fi_addr_t peer[2];
	CHECK_RC(fi_av_insert(pav, names, 2, peer, 0, NULL), 2);
	char rx[16];
	OK(fi_recv(pep, rx, sizeof(rx), NULL, FI_ADDR_UNSPEC, (void *)1));
	struct fi_cq_entry e;
	CHECK_RC(fi_cq_read(pcq, &e, 1), -FI_EAGAIN);
	/* The first peer endpoint is closed in order: nothing to report. */
	char c;
	CHECK(write(to_child[1], "x", 1) == 1);
	CHECK(read(to_parent[0], &c, 1) == 1);
	CHECK_RC(fi_cq_read(pcq, &e, 1), -FI_EAGAIN);
	CHECK_RC(fi_cq_read(fdcq, &e, 1), -FI_EAGAIN);
	/* The peer process dies with the second open. */
	CHECK(kill(child, SIGKILL) == 0);
	CHECK(waitpid(child, NULL, 0) == child);
	/* No timeout: only the report can end this wait (the test harness bounds the run). */
	CHECK_RC(fi_cq_sread(pcq, &e, 1, NULL, -1), -FI_EAVAIL);
	check_peer_gone(pcq);
	struct pollfd p = { .fd = fd, .events = POLLIN };
	CHECK(poll(&p, 1, 5000) == 1 && (p.revents & POLLIN));
	CHECK_RC(fi_cq_read(fdcq, &e, 1), -FI_EAVAIL);
	check_peer_gone(fdcq);
	/* The receive for any source is still posted: it is cancelled at close. */
	OK(fi_cancel(&pep->fid, (void *)1));
	struct fi_cq_err_entry err = { 0 };
	CHECK_RC(fi_cq_sread(pcq, &e, 1, NULL, 5000), -FI_EAVAIL);
	CHECK_RC(fi_cq_readerr(pcq, &err, 0), 1);
	CHECK(err.op_context == (void *)1 && err.err == FI_ECANCELED);
	OK(fi_close(&pep->fid));
	OK(fi_close(&fdcq->fid));
	OK(fi_close(&pcq->fid));
	OK(fi_close(&pav->fid));
	OK(fi_close(&dom->fid));
	OK(fi_close(&fab->fid));
	for (int k = 0; k < 2; k++) {
		close(to_parent[k]);
		close(to_child[k]);
	}
	fi_freeinfo(list);
}

/* Run with FI_VFABRIC_MEM_MB=1: a transfer whose bounce buffer can never fit the 1 MiB shared
 * region fails at once with -FI_ENOMEM (not -FI_EAGAIN forever); smaller ones still work. */
static void suite_mem_small(void)
{
	setup(FI_EP_RDM, FI_CQ_FORMAT_DATA, FI_AV_TABLE);
	size_t big = 1 << 20;
	char *tx = calloc(1, big), *rx = calloc(1, big);
	CHECK(tx && rx);
	CHECK_RC(fi_send(ep[0], tx, big, NULL, addr[1], (void *)1), -FI_ENOMEM);
	CHECK_RC(fi_recv(ep[1], rx, big, NULL, FI_ADDR_UNSPEC, (void *)2), -FI_ENOMEM);
	struct fi_cq_data_entry e;
	OK(fi_recv(ep[1], rx, 4096, NULL, FI_ADDR_UNSPEC, (void *)3));
	OK(fi_send(ep[0], tx, 4096, NULL, addr[1], (void *)4));
	CHECK_RC(poll_cq(cq[0], &e), 1);
	CHECK(e.op_context == (void *)4);
	CHECK_RC(poll_cq(cq[1], &e), 1);
	CHECK(e.op_context == (void *)3 && e.len == 4096);
	free(tx);
	free(rx);
	teardown();
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s errors|msg|tagged|cq|av|cm|dgram|waitfd|threads\n", argv[0]);
		return 2;
	}
	const char *s = argv[1];
	if (!strcmp(s, "errors"))
		suite_errors();
	else if (!strcmp(s, "msg"))
		suite_msg();
	else if (!strcmp(s, "tagged"))
		suite_tagged();
	else if (!strcmp(s, "cq"))
		suite_cq();
	else if (!strcmp(s, "av"))
		suite_av();
	else if (!strcmp(s, "cm"))
		suite_cm();
	else if (!strcmp(s, "dgram"))
		suite_dgram();
	else if (!strcmp(s, "waitfd"))
		suite_waitfd();
	else if (!strcmp(s, "threads"))
		suite_threads();
	else if (!strcmp(s, "cq_threads"))
		suite_cq_threads();
	else if (!strcmp(s, "rma"))
		suite_rma();
	else if (!strcmp(s, "atomic"))
		suite_atomic();
	else if (!strcmp(s, "rma_event"))
		suite_rma_event();
	else if (!strcmp(s, "mem_small"))
		suite_mem_small();
	else if (!strcmp(s, "peer_gone"))
		suite_peer_gone();
	else if (!strcmp(s, "cm_peer_death_server"))
		suite_cm_peer_death_server();
	else if (!strcmp(s, "cm_peer_death_client"))
		suite_cm_peer_death_client();
	else
		return 2;
	printf("%s: ok\n", s);
	return 0;
}
