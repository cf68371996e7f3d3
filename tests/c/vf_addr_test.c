/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Standard addressing and fi_getinfo's hint rules through the plain libfabric 1.17 API, the
 * way client/server programs written for tcp use them. Built and run by tests/provider.rs.
 *
 *   vf_addr_test rdm-server PORT          RDM server on 127.0.0.1:PORT (FI_SOURCE)
 *   vf_addr_test rdm-client HOST PORT     RDM client of HOST:PORT (fi_av_insert of dest_addr)
 *   vf_addr_test msg-server PORT          MSG server: fi_passive_ep + fi_listen on PORT
 *   vf_addr_test msg-client HOST PORT     MSG client: fi_connect(info->dest_addr), CM data
 *   vf_addr_test addr                     one process: formats, names, services, errors
 *   vf_addr_test hints                    one process: fi_getinfo(3) hint rules
 *   vf_addr_test hosts OTHER_IP           daemon with an uplink on 127.0.0.1 and a peer host
 *                                         at OTHER_IP: uplink addresses name hosts
 *
 * VF_SELF_IP and VF_PEER_IP (default 127.0.0.1): the address the client or server expects its
 * own endpoint to be named by, and its peer's (with several hosts, each host's uplink address:
 * tests/hosts.rs runs the two on two hosts).
 *
 * The client and server exchange ROUNDS messages each way and check every byte. Each prints
 * "<mode>: ok" on success; a failed check prints file:line and exits 1.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>

#include "vf_check.h"

#define V FI_VERSION(1, 17)
#define ROUNDS 20
#define MSG_LEN 4000
/* How long a side waits for its peer before it fails (the test harness also times out). */
#define WAIT_SECONDS 30

/* The address `var` names (VF_SELF_IP, VF_PEER_IP), 127.0.0.1 by default. */
static const char *ip_of(const char *var)
{
	const char *v = getenv(var);
	return v && *v ? v : "127.0.0.1";
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static struct fi_info *hints_of(enum fi_ep_type type)
{
	struct fi_info *h = fi_allocinfo();
	CHECK(h);
	h->ep_attr->type = type;
	h->caps = FI_MSG;
	h->fabric_attr->prov_name = strdup("vfabric");
	return h;
}

struct side {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_eq *eq;
	struct fid_pep *pep;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep;
	fi_addr_t peer;
};

static void open_fabric(struct side *s, struct fi_info *info)
{
	OK(fi_fabric(info->fabric_attr, &s->fabric, NULL));
	struct fi_eq_attr eq_attr = { .wait_obj = FI_WAIT_UNSPEC };
	OK(fi_eq_open(s->fabric, &eq_attr, &s->eq, NULL));
}

/* Domain, CQ, AV (not for MSG) and an enabled endpoint of `info`. */
static void open_ep(struct side *s, struct fi_info *info)
{
	OK(fi_domain(s->fabric, info, &s->domain, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .size = 64 };
	OK(fi_cq_open(s->domain, &cq_attr, &s->cq, NULL));
	OK(fi_endpoint(s->domain, info, &s->ep, NULL));
	if (info->ep_attr->type == FI_EP_MSG) {
		OK(fi_ep_bind(s->ep, &s->eq->fid, 0));
	} else {
		struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
		OK(fi_av_open(s->domain, &av_attr, &s->av, NULL));
		OK(fi_ep_bind(s->ep, &s->av->fid, 0));
	}
	OK(fi_ep_bind(s->ep, &s->cq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(s->ep));
}

static void close_side(struct side *s)
{
	if (s->ep)
		OK(fi_close(&s->ep->fid));
	if (s->pep)
		OK(fi_close(&s->pep->fid));
	if (s->cq)
		OK(fi_close(&s->cq->fid));
	if (s->av)
		OK(fi_close(&s->av->fid));
	if (s->domain)
		OK(fi_close(&s->domain->fid));
	if (s->eq)
		OK(fi_close(&s->eq->fid));
	if (s->fabric)
		OK(fi_close(&s->fabric->fid));
	fi_freeinfo(s->info);
}

/* One completion of the CQ (an error completion fails the test). */
static struct fi_cq_msg_entry wait_cq(struct side *s)
{
	struct fi_cq_msg_entry e;
	double end = now() + WAIT_SECONDS;
	for (;;) {
		ssize_t n = fi_cq_read(s->cq, &e, 1);
		if (n == 1)
			return e;
		if (n == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			fi_cq_readerr(s->cq, &err, 0);
			fprintf(stderr, "error completion: %s\n", fi_strerror(err.err));
			exit(1);
		}
		CHECK(n == -FI_EAGAIN);
		CHECK(now() < end);
	}
}

static void fill(char *b, int round, int who)
{
	for (int i = 0; i < MSG_LEN; i++)
		b[i] = (char)(i * 7 + round * 13 + who);
}

/* ROUNDS messages each way; the client sends first. Every byte is checked. */
static void exchange(struct side *s, int client)
{
	static char out[MSG_LEN], in[MSG_LEN], want[MSG_LEN];
	for (int r = 0; r < ROUNDS; r++) {
		OK(fi_recv(s->ep, in, sizeof(in), NULL, FI_ADDR_UNSPEC, in));
		if (client) {
			fill(out, r, 1);
			OK(fi_send(s->ep, out, sizeof(out), NULL, s->peer, out));
		}
		int got_send = !client, got_recv = 0;
		while (!got_send || !got_recv) {
			struct fi_cq_msg_entry e = wait_cq(s);
			if (e.flags & FI_RECV) {
				CHECK(e.len == MSG_LEN);
				fill(want, r, client ? 2 : 1);
				CHECK(memcmp(in, want, MSG_LEN) == 0);
				got_recv = 1;
				if (!client) {
					fill(out, r, 2);
					OK(fi_send(s->ep, out, sizeof(out), NULL, s->peer, out));
					got_send = 0;
				}
			} else {
				CHECK(e.flags & FI_SEND);
				got_send = 1;
			}
		}
	}
}

static void check_sin(const void *addr, size_t len, const char *ip, int port)
{
	const struct sockaddr_in *sin = addr;
	CHECK(len == sizeof(struct sockaddr_in));
	CHECK(sin->sin_family == AF_INET);
	char buf[INET_ADDRSTRLEN];
	CHECK(inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)));
	CHECK(strcmp(buf, ip) == 0);
	if (port >= 0)
		CHECK(ntohs(sin->sin_port) == port);
}

/* ---- RDM: a server on a port, a client that knows only host and port ---------------------- */

static void rdm_server(const char *port)
{
	struct side s = { 0 };
	struct fi_info *h = hints_of(FI_EP_RDM);
	OK(fi_getinfo(V, NULL, port, FI_SOURCE, h, &s.info));
	fi_freeinfo(h);
	CHECK(s.info->addr_format == FI_SOCKADDR_IN);
	CHECK(s.info->src_addr && s.info->dest_addr == NULL && s.info->dest_addrlen == 0);
	check_sin(s.info->src_addr, s.info->src_addrlen, "127.0.0.1", atoi(port));
	open_fabric(&s, s.info);
	open_ep(&s, s.info);
	/* Its name is the host and the port. */
	struct sockaddr_in name;
	size_t len = 1;
	CHECK_RC(fi_getname(&s.ep->fid, &name, &len), -FI_ETOOSMALL);
	CHECK(len == sizeof(name));
	OK(fi_getname(&s.ep->fid, &name, &len));
	check_sin(&name, len, ip_of("VF_SELF_IP"), atoi(port));
	printf("rdm-server: listening\n");
	fflush(stdout);
	/* The client's first message is its name (a sockaddr_in). */
	struct sockaddr_in peer;
	OK(fi_recv(s.ep, &peer, sizeof(peer), NULL, FI_ADDR_UNSPEC, NULL));
	struct fi_cq_msg_entry e = wait_cq(&s);
	CHECK(e.flags & FI_RECV && e.len == sizeof(peer));
	check_sin(&peer, sizeof(peer), ip_of("VF_PEER_IP"), -1);
	CHECK_RC(fi_av_insert(s.av, &peer, 1, &s.peer, 0, NULL), 1);
	exchange(&s, 0);
	close_side(&s);
	printf("rdm-server: ok\n");
}

static void rdm_client(const char *host, const char *port)
{
	struct side s = { 0 };
	struct fi_info *h = hints_of(FI_EP_RDM);
	OK(fi_getinfo(V, host, port, 0, h, &s.info));
	fi_freeinfo(h);
	CHECK(s.info->addr_format == FI_SOCKADDR_IN);
	check_sin(s.info->dest_addr, s.info->dest_addrlen, ip_of("VF_PEER_IP"), atoi(port));
	/* A source address of the same format is filled in, with its length. */
	CHECK(s.info->src_addr && s.info->src_addrlen == sizeof(struct sockaddr_in));
	open_fabric(&s, s.info);
	open_ep(&s, s.info);
	/* The server may not have bound its port yet: insert until it has. */
	double end = now() + WAIT_SECONDS;
	for (;;) {
		int n = fi_av_insert(s.av, s.info->dest_addr, 1, &s.peer, 0, NULL);
		if (n == 1)
			break;
		CHECK(n == 0 && s.peer == FI_ADDR_NOTAVAIL);
		CHECK(now() < end);
		usleep(20000);
	}
	/* fi_av_straddr and fi_av_lookup speak the domain's format. */
	char buf[64];
	size_t blen = sizeof(buf);
	CHECK(fi_av_straddr(s.av, s.info->dest_addr, buf, &blen) == buf);
	char want[64];
	snprintf(want, sizeof(want), "fi_sockaddr_in://%s:%s", ip_of("VF_PEER_IP"), port);
	CHECK(strcmp(buf, want) == 0);
	struct sockaddr_in back;
	size_t back_len = sizeof(back);
	OK(fi_av_lookup(s.av, s.peer, &back, &back_len));
	CHECK(back_len == sizeof(back) && memcmp(&back, s.info->dest_addr, sizeof(back)) == 0);
	/* Tell the server who we are: our name, a sockaddr_in of an ephemeral port. */
	struct sockaddr_in name;
	size_t len = sizeof(name);
	OK(fi_getname(&s.ep->fid, &name, &len));
	check_sin(&name, len, ip_of("VF_SELF_IP"), -1);
	CHECK(ntohs(name.sin_port) != 0 && ntohs(name.sin_port) != atoi(port));
	OK(fi_send(s.ep, &name, sizeof(name), NULL, s.peer, NULL));
	CHECK(wait_cq(&s).flags & FI_SEND);
	exchange(&s, 1);
	close_side(&s);
	printf("rdm-client: ok\n");
}

/* ---- MSG: a listener on a port, a client connecting to host and port ---------------------- */

static void wait_eq(struct side *s, uint32_t want, struct fi_eq_cm_entry *e, size_t len)
{
	uint32_t event;
	ssize_t n = fi_eq_sread(s->eq, &event, e, len, WAIT_SECONDS * 1000, 0);
	if (n == -FI_EAVAIL) {
		struct fi_eq_err_entry err = { 0 };
		fi_eq_readerr(s->eq, &err, 0);
		fprintf(stderr, "EQ error: %s\n", fi_strerror(err.err));
		exit(1);
	}
	CHECK(n >= (ssize_t)sizeof(struct fi_eq_cm_entry));
	CHECK(event == want);
}

static const char hello[] = "hello from the client";
static const char welcome[] = "welcome, client";

static void msg_server(const char *port)
{
	struct side s = { 0 };
	struct fi_info *h = hints_of(FI_EP_MSG);
	OK(fi_getinfo(V, NULL, port, FI_SOURCE, h, &s.info));
	fi_freeinfo(h);
	CHECK(s.info->addr_format == FI_SOCKADDR_IN);
	check_sin(s.info->src_addr, s.info->src_addrlen, "127.0.0.1", atoi(port));
	open_fabric(&s, s.info);
	OK(fi_passive_ep(s.fabric, s.info, &s.pep, NULL));
	OK(fi_pep_bind(s.pep, &s.eq->fid, 0));
	OK(fi_listen(s.pep));
	struct sockaddr_in name;
	size_t len = sizeof(name);
	OK(fi_getname(&s.pep->fid, &name, &len));
	check_sin(&name, len, ip_of("VF_SELF_IP"), atoi(port));
	printf("msg-server: listening\n");
	fflush(stdout);
	struct {
		struct fi_eq_cm_entry e;
		char data[256];
	} ev;
	wait_eq(&s, FI_CONNREQ, &ev.e, sizeof(ev));
	CHECK(strcmp(ev.data, hello) == 0);
	struct fi_info *ci = ev.e.info;
	CHECK(ci->addr_format == FI_SOCKADDR_IN && ci->handle);
	check_sin(ci->dest_addr, ci->dest_addrlen, ip_of("VF_PEER_IP"), -1);
	open_ep(&s, ci);
	OK(fi_accept(s.ep, welcome, sizeof(welcome)));
	wait_eq(&s, FI_CONNECTED, &ev.e, sizeof(ev));
	CHECK(ev.e.fid == &s.ep->fid);
	struct sockaddr_in peer;
	len = sizeof(peer);
	OK(fi_getpeer(s.ep, &peer, &len));
	CHECK(memcmp(&peer, ci->dest_addr, sizeof(peer)) == 0);
	fi_freeinfo(ci);
	s.peer = FI_ADDR_UNSPEC;
	exchange(&s, 0);
	close_side(&s);
	printf("msg-server: ok\n");
}

static void msg_client(const char *host, const char *port)
{
	struct side s = { 0 };
	struct fi_info *h = hints_of(FI_EP_MSG);
	OK(fi_getinfo(V, host, port, 0, h, &s.info));
	fi_freeinfo(h);
	CHECK(s.info->addr_format == FI_SOCKADDR_IN);
	check_sin(s.info->dest_addr, s.info->dest_addrlen, ip_of("VF_PEER_IP"), atoi(port));
	open_fabric(&s, s.info);
	open_ep(&s, s.info);
	struct {
		struct fi_eq_cm_entry e;
		char data[256];
	} ev;
	/* Nobody listens yet: the connection is refused at once; try again until it is not. */
	double end = now() + WAIT_SECONDS;
	for (;;) {
		int rc = fi_connect(s.ep, s.info->dest_addr, hello, sizeof(hello));
		if (rc == 0)
			break;
		CHECK_RC(rc, -FI_EADDRNOTAVAIL);
		CHECK(now() < end);
		usleep(20000);
	}
	wait_eq(&s, FI_CONNECTED, &ev.e, sizeof(ev));
	CHECK(ev.e.fid == &s.ep->fid);
	CHECK(strcmp(ev.data, welcome) == 0);
	struct sockaddr_in peer;
	size_t len = sizeof(peer);
	OK(fi_getpeer(s.ep, &peer, &len));
	check_sin(&peer, len, ip_of("VF_PEER_IP"), -1);
	s.peer = FI_ADDR_UNSPEC;
	exchange(&s, 1);
	close_side(&s);
	printf("msg-client: ok\n");
}

/* ---- Formats, names and services in one process ------------------------------------------- */

static void addr_suite(void)
{
	const char *port = "47123";
	struct side a = { 0 }, b = { 0 };
	struct fi_info *h = hints_of(FI_EP_RDM);

	/* Service only (no FI_SOURCE) names a local service too. */
	OK(fi_getinfo(V, NULL, port, 0, h, &a.info));
	check_sin(a.info->src_addr, a.info->src_addrlen, "127.0.0.1", atoi(port));
	open_fabric(&a, a.info);
	open_ep(&a, a.info);
	/* A second endpoint on the same service: -FI_EADDRINUSE at fi_enable. */
	OK(fi_domain(a.fabric, a.info, &b.domain, NULL));
	OK(fi_endpoint(b.domain, a.info, &b.ep, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	OK(fi_av_open(b.domain, &av_attr, &b.av, NULL));
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_MSG, .size = 8 };
	OK(fi_cq_open(b.domain, &cq_attr, &b.cq, NULL));
	OK(fi_ep_bind(b.ep, &b.av->fid, 0));
	OK(fi_ep_bind(b.ep, &b.cq->fid, FI_TRANSMIT | FI_RECV));
	CHECK_RC(fi_enable(b.ep), -FI_EADDRINUSE);
	OK(fi_close(&b.ep->fid));
	b.ep = NULL;

	/* localhost and the host's name resolve to this host; fi_av_insertsvc by host and port. */
	fi_addr_t x = 0;
	CHECK_RC(fi_av_insertsvc(b.av, "localhost", port, &x, 0, NULL), 1);
	fi_addr_t y = 0;
	CHECK_RC(fi_av_insertsvc(b.av, "127.0.0.1", port, &y, 0, NULL), 1);
	/* A service nobody binds, a host that is not this machine. */
	CHECK_RC(fi_av_insertsvc(b.av, "127.0.0.1", "47124", &y, 0, NULL), 0);
	CHECK(y == FI_ADDR_NOTAVAIL);
	CHECK_RC(fi_av_insertsvc(b.av, "192.0.2.1", port, &y, 0, NULL), 0);
	/* IPv6: ::1 with FI_SOCKADDR_IN6, names in that format. */
	struct fi_info *h6 = hints_of(FI_EP_RDM);
	h6->addr_format = FI_SOCKADDR_IN6;
	struct fi_info *i6;
	OK(fi_getinfo(V, "::1", "47125", FI_SOURCE, h6, &i6));
	CHECK(i6->addr_format == FI_SOCKADDR_IN6);
	CHECK(i6->src_addrlen == sizeof(struct sockaddr_in6));
	struct side c = { 0 };
	c.fabric = a.fabric;
	OK(fi_domain(c.fabric, i6, &c.domain, NULL));
	OK(fi_cq_open(c.domain, &cq_attr, &c.cq, NULL));
	OK(fi_av_open(c.domain, &av_attr, &c.av, NULL));
	OK(fi_endpoint(c.domain, i6, &c.ep, NULL));
	OK(fi_ep_bind(c.ep, &c.av->fid, 0));
	OK(fi_ep_bind(c.ep, &c.cq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(c.ep));
	struct sockaddr_in6 n6;
	size_t len = sizeof(n6);
	OK(fi_getname(&c.ep->fid, &n6, &len));
	CHECK(len == sizeof(n6) && n6.sin6_family == AF_INET6 && ntohs(n6.sin6_port) == 47125);
	/* The IPv4 service is reachable from an IPv6 AV by its mapped address. */
	struct sockaddr_in6 mapped = { .sin6_family = AF_INET6, .sin6_port = htons(atoi(port)) };
	CHECK(inet_pton(AF_INET6, "::ffff:127.0.0.1", &mapped.sin6_addr) == 1);
	fi_addr_t m;
	CHECK_RC(fi_av_insert(c.av, &mapped, 1, &m, 0, NULL), 1);
	/* A self-send through the IPv6 name. */
	fi_addr_t me;
	CHECK_RC(fi_av_insert(c.av, &n6, 1, &me, 0, NULL), 1);
	char msg[16] = "over ipv6", got[16] = { 0 };
	OK(fi_recv(c.ep, got, sizeof(got), NULL, FI_ADDR_UNSPEC, NULL));
	OK(fi_send(c.ep, msg, sizeof(msg), NULL, me, NULL));
	int seen = 0;
	while (seen < 2) {
		struct fi_cq_msg_entry e = wait_cq(&c);
		seen++;
		(void)e;
	}
	CHECK(strcmp(got, "over ipv6") == 0);
	OK(fi_close(&c.ep->fid));
	OK(fi_close(&c.av->fid));
	OK(fi_close(&c.cq->fid));
	OK(fi_close(&c.domain->fid));
	fi_freeinfo(i6);
	fi_freeinfo(h6);

	/* FI_ADDR_STR: node strings in that format, names as NUL-terminated strings. */
	struct fi_info *hs = hints_of(FI_EP_RDM);
	hs->addr_format = FI_ADDR_STR;
	struct fi_info *is;
	OK(fi_getinfo(V, "fi_sockaddr_in://127.0.0.1:47126", NULL, FI_SOURCE, hs, &is));
	CHECK(is->addr_format == FI_ADDR_STR);
	CHECK(strcmp(is->src_addr, "fi_sockaddr_in://127.0.0.1:47126") == 0);
	CHECK(is->src_addrlen == strlen(is->src_addr) + 1);
	struct fi_info *isd;
	OK(fi_getinfo(V, "127.0.0.1", port, 0, hs, &isd));
	CHECK(isd->addr_format == FI_ADDR_STR);
	char want[64];
	snprintf(want, sizeof(want), "fi_sockaddr_in://127.0.0.1:%s", port);
	CHECK(strcmp(isd->dest_addr, want) == 0);
	OK(fi_domain(a.fabric, isd, &c.domain, NULL));
	OK(fi_av_open(c.domain, &av_attr, &c.av, NULL));
	CHECK_RC(fi_av_insert(c.av, isd->dest_addr, 1, &m, 0, NULL), 1);
	char sbuf[64];
	size_t slen = sizeof(sbuf);
	OK(fi_av_lookup(c.av, m, sbuf, &slen));
	CHECK(strcmp(sbuf, want) == 0 && slen == strlen(want) + 1);
	OK(fi_endpoint(c.domain, is, &c.ep, NULL));
	OK(fi_cq_open(c.domain, &cq_attr, &c.cq, NULL));
	OK(fi_ep_bind(c.ep, &c.av->fid, 0));
	OK(fi_ep_bind(c.ep, &c.cq->fid, FI_TRANSMIT | FI_RECV));
	OK(fi_enable(c.ep));
	slen = sizeof(sbuf);
	OK(fi_getname(&c.ep->fid, sbuf, &slen));
	CHECK(strcmp(sbuf, "fi_sockaddr_in://127.0.0.1:47126") == 0);
	OK(fi_close(&c.ep->fid));
	OK(fi_close(&c.cq->fid));
	OK(fi_close(&c.av->fid));
	OK(fi_close(&c.domain->fid));
	fi_freeinfo(is);
	fi_freeinfo(isd);
	fi_freeinfo(hs);

	/* Nodes and services that cannot be answered: -FI_ENODATA. */
	struct fi_info *none = NULL;
	CHECK_RC(fi_getinfo(V, "192.0.2.1", port, 0, h, &none), -FI_ENODATA);
	CHECK_RC(fi_getinfo(V, "127.0.0.1", "no-such-service-name", 0, h, &none), -FI_ENODATA);
	CHECK_RC(fi_getinfo(V, "no-such-host.invalid", port, 0, h, &none), -FI_ENODATA);
	/* FI_NUMERICHOST: a numeric address is taken, a name is not looked up. */
	CHECK_RC(fi_getinfo(V, "localhost", port, FI_NUMERICHOST, h, &none), -FI_ENODATA);
	OK(fi_getinfo(V, "127.0.0.1", port, FI_NUMERICHOST, h, &none));
	fi_freeinfo(none);
	none = NULL;
	h->addr_format = FI_SOCKADDR_IB;
	CHECK_RC(fi_getinfo(V, "127.0.0.1", port, 0, h, &none), -FI_ENODATA);
	h->addr_format = FI_SOCKADDR_IN;
	CHECK_RC(fi_getinfo(V, "::1", port, 0, h, &none), -FI_ENODATA);
	/* A malformed address in the hints. */
	h->addr_format = FI_SOCKADDR_IN;
	h->dest_addr = calloc(1, 4);
	h->dest_addrlen = 4;
	CHECK_RC(fi_getinfo(V, NULL, NULL, 0, h, &none), -FI_ENODATA);
	/* A sockaddr_in in the hints is taken as it is. */
	free(h->dest_addr);
	struct sockaddr_in *sin = calloc(1, sizeof(*sin));
	sin->sin_family = AF_INET;
	sin->sin_port = htons(atoi(port));
	sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	h->dest_addr = sin;
	h->dest_addrlen = sizeof(*sin);
	struct fi_info *hd;
	OK(fi_getinfo(V, NULL, NULL, 0, h, &hd));
	CHECK(hd->addr_format == FI_SOCKADDR_IN);
	check_sin(hd->dest_addr, hd->dest_addrlen, "127.0.0.1", atoi(port));
	fi_freeinfo(hd);
	h->addr_format = FI_FORMAT_UNSPEC;
	free(h->dest_addr);
	h->dest_addr = NULL;
	h->dest_addrlen = 0;

	OK(fi_close(&b.cq->fid));
	OK(fi_close(&b.av->fid));
	OK(fi_close(&b.domain->fid));
	b.cq = NULL;
	b.av = NULL;
	b.domain = NULL;
	close_side(&a);
	/* The service is free again once its endpoint closed. */
	OK(fi_getinfo(V, NULL, port, FI_SOURCE, h, &a.info));
	struct side d = { 0 };
	open_fabric(&d, a.info);
	open_ep(&d, a.info);
	d.info = a.info;
	close_side(&d);
	fi_freeinfo(h);
	printf("addr: ok\n");
}

/* ---- Several hosts: uplink addresses name hosts ----------------------------------------- */

/* The device's daemon listens on 127.0.0.1 (host 1) and has a peer host at `other`. */
static void hosts_suite(const char *other)
{
	struct fi_info *h = hints_of(FI_EP_RDM), *i = NULL;
	/* This host's uplink address names this host: a local service resolves. */
	struct side a = { 0 };
	OK(fi_getinfo(V, "127.0.0.1", "47200", FI_SOURCE, h, &a.info));
	open_fabric(&a, a.info);
	open_ep(&a, a.info);
	fi_addr_t x;
	CHECK_RC(fi_av_insertsvc(a.av, "127.0.0.1", "47200", &x, 0, NULL), 1);
	/* The peer's uplink address names the peer host: fi_getinfo answers with it... */
	OK(fi_getinfo(V, other, "47200", 0, h, &i));
	char want[64];
	snprintf(want, sizeof(want), "%s", other);
	check_sin(i->dest_addr, i->dest_addrlen, want, 47200);
	/* ...its services are asked of it through the uplink; a silent peer (down) answers
	 * nothing, so nothing is inserted (-FI_EHOSTUNREACH, logged). */
	CHECK_RC(fi_av_insert(a.av, i->dest_addr, 1, &x, 0, NULL), 0);
	CHECK(x == FI_ADDR_NOTAVAIL);
	fi_freeinfo(i);
	/* Another host's address is no source address here; an address of no host is nothing. */
	CHECK_RC(fi_getinfo(V, other, "47201", FI_SOURCE, h, &i), -FI_ENODATA);
	CHECK_RC(fi_getinfo(V, "192.0.2.1", "47200", 0, h, &i), -FI_ENODATA);
	close_side(&a);
	fi_freeinfo(h);
	printf("hosts: ok\n");
}

/* ---- fi_getinfo(3) hint rules -------------------------------------------------------------- */

/* fi_getinfo with hints `h`: every answer must honour them; returns the rc. */
static int getinfo_checked(uint32_t version, struct fi_info *h, struct fi_info **out)
{
	struct fi_info *info = NULL;
	int rc = fi_getinfo(version, NULL, NULL, 0, h, &info);
	if (rc)
		return rc;
	for (struct fi_info *i = info; i; i = i->next) {
		/* Caps asked for are given; modes required are ones the consumer supports. */
		CHECK((i->caps & h->caps) == h->caps);
		CHECK((i->mode & ~h->mode) == 0);
		CHECK((i->tx_attr->mode & ~h->mode) == 0 && (i->rx_attr->mode & ~h->mode) == 0);
		if (h->ep_attr->type)
			CHECK(i->ep_attr->type == h->ep_attr->type);
		/* Ordering asked for is given. */
		CHECK((i->tx_attr->msg_order & h->tx_attr->msg_order) == h->tx_attr->msg_order);
		CHECK((i->rx_attr->msg_order & h->rx_attr->msg_order) == h->rx_attr->msg_order);
		CHECK((i->tx_attr->comp_order & h->tx_attr->comp_order) == h->tx_attr->comp_order);
		CHECK((i->tx_attr->op_flags & h->tx_attr->op_flags) == h->tx_attr->op_flags);
		if (h->addr_format)
			CHECK(i->addr_format == h->addr_format);
		CHECK(i->fabric_attr->api_version == version);
		/* mr_mode: with API 1.5+ only bits the consumer offered. */
		if (version >= FI_VERSION(1, 5) && h->domain_attr->mr_mode != FI_MR_BASIC &&
		    h->domain_attr->mr_mode != FI_MR_SCALABLE)
			CHECK((i->domain_attr->mr_mode & ~h->domain_attr->mr_mode) == 0);
		if (h->domain_attr->threading)
			CHECK(i->domain_attr->threading == h->domain_attr->threading);
		if (h->ep_attr->mem_tag_format)
			CHECK(i->ep_attr->mem_tag_format == h->ep_attr->mem_tag_format);
		CHECK(i->src_addr == NULL || i->src_addrlen > 0);
		CHECK(i->dest_addr == NULL || i->dest_addrlen > 0);
	}
	if (out)
		*out = info;
	else
		fi_freeinfo(info);
	return 0;
}

static void hints_suite(void)
{
	struct fi_info *h = hints_of(FI_EP_RDM), *i;
	/* An open domain keeps the device's description at hand: the fi_getinfo calls below do not
	 * probe the device again (dozens of probes under memcheck on a loaded machine can exceed
	 * the probe's deadline). */
	struct side keep = { 0 };
	OK(fi_getinfo(V, NULL, NULL, 0, h, &keep.info));
	open_fabric(&keep, keep.info);
	OK(fi_domain(keep.fabric, keep.info, &keep.domain, NULL));

	/* Ordering: FI_ORDER_SAS is given when asked for; orders the device lacks are not. */
	h->tx_attr->msg_order = FI_ORDER_SAS;
	h->rx_attr->msg_order = FI_ORDER_SAS;
	OK(getinfo_checked(V, h, &i));
	CHECK(i->tx_attr->msg_order & FI_ORDER_SAS);
	fi_freeinfo(i);
	h->tx_attr->msg_order = FI_ORDER_RAW | FI_ORDER_SAS;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->tx_attr->msg_order = FI_ORDER_SAS;
	h->tx_attr->comp_order = FI_ORDER_STRICT;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->tx_attr->comp_order = FI_ORDER_NONE;

	/* Caps: each offered primary and secondary cap comes back when asked for. */
	uint64_t caps[] = { FI_MSG, FI_TAGGED, FI_MSG | FI_TAGGED, FI_MSG | FI_SOURCE,
			    FI_TAGGED | FI_DIRECTED_RECV, FI_MSG | FI_MULTI_RECV,
			    FI_MSG | FI_SEND, FI_MSG | FI_RECV, FI_MSG | FI_LOCAL_COMM | FI_REMOTE_COMM };
	for (size_t k = 0; k < sizeof(caps) / sizeof(caps[0]); k++) {
		h->caps = caps[k];
		OK(getinfo_checked(V, h, &i));
		if (!(caps[k] & FI_SEND) && !(caps[k] & FI_RECV))
			CHECK((i->caps & (FI_SEND | FI_RECV)) == (FI_SEND | FI_RECV));
		/* Primary capabilities (and their modifiers) not selected are not enabled. */
		uint64_t primary = FI_MSG | FI_TAGGED | FI_RMA | FI_ATOMIC | FI_DIRECTED_RECV |
				   FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
		for (struct fi_info *x = i; x; x = x->next)
			CHECK((x->caps & primary & ~(caps[k] | FI_SEND | FI_RECV)) == 0);
		fi_freeinfo(i);
	}
	/* RMA with one modifier: that direction only. */
	h->caps = FI_RMA | FI_REMOTE_WRITE;
	OK(getinfo_checked(V, h, &i));
	CHECK((i->caps & (FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE)) == FI_REMOTE_WRITE);
	fi_freeinfo(i);
	/* Caps the provider does not have: no answer at all. */
	uint64_t missing[] = { FI_MSG | FI_TRIGGER, FI_MSG | FI_NAMED_RX_CTX, FI_MSG | FI_SHARED_AV,
			       FI_MSG | FI_HMEM, FI_COLLECTIVE | FI_MSG, FI_MSG | FI_SOURCE_ERR,
			       FI_MSG | FI_VARIABLE_MSG };
	for (size_t k = 0; k < sizeof(missing) / sizeof(missing[0]); k++) {
		h->caps = missing[k];
		CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	}
	h->caps = FI_MSG;
	h->domain_attr->caps = FI_SHARED_AV;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->domain_attr->caps = FI_LOCAL_COMM | FI_REMOTE_COMM;
	OK(getinfo_checked(V, h, NULL));
	h->domain_attr->caps = 0;

	/* Modes: whatever the consumer supports, the provider requires none. */
	h->mode = FI_CONTEXT | FI_CONTEXT2 | FI_MSG_PREFIX | FI_RX_CQ_DATA;
	OK(getinfo_checked(V, h, NULL));
	h->mode = 0;
	OK(getinfo_checked(V, h, NULL));

	/* Default op_flags asked for become the endpoint's defaults; unknown ones: no answer. */
	h->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
	OK(getinfo_checked(V, h, NULL));
	h->tx_attr->op_flags = FI_MULTICAST;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->tx_attr->op_flags = 0;

	/* mr_mode, API 1.5+: only offered bits come back; legacy values are echoed. */
	h->caps = FI_MSG | FI_RMA;
	h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_PROV_KEY | FI_MR_ALLOCATED |
				  FI_MR_ENDPOINT;
	OK(getinfo_checked(V, h, &i));
	CHECK((i->domain_attr->mr_mode & (FI_MR_ENDPOINT | FI_MR_ALLOCATED)) == 0);
	fi_freeinfo(i);
	h->domain_attr->mr_mode = 0;
	OK(getinfo_checked(V, h, &i));
	CHECK(i->domain_attr->mr_mode == 0);
	fi_freeinfo(i);
	h->domain_attr->mr_mode = FI_MR_BASIC;
	OK(getinfo_checked(V, h, &i));
	CHECK(i->domain_attr->mr_mode == FI_MR_BASIC);
	fi_freeinfo(i);
	h->domain_attr->mr_mode = FI_MR_SCALABLE;
	OK(getinfo_checked(V, h, &i));
	CHECK(i->domain_attr->mr_mode == FI_MR_SCALABLE);
	fi_freeinfo(i);
	h->domain_attr->mr_mode = FI_MR_BASIC | FI_MR_LOCAL;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	/* API 1.0: mr_mode is the old enum; FI_MR_UNSPEC lets the provider choose one. */
	h->domain_attr->mr_mode = FI_MR_UNSPEC;
	OK(getinfo_checked(FI_VERSION(1, 0), h, &i));
	CHECK(i->domain_attr->mr_mode == FI_MR_BASIC || i->domain_attr->mr_mode == FI_MR_SCALABLE);
	CHECK(i->fabric_attr->api_version == FI_VERSION(1, 0));
	fi_freeinfo(i);
	h->domain_attr->mr_mode = FI_MR_BASIC;
	OK(getinfo_checked(FI_VERSION(1, 0), h, &i));
	CHECK(i->domain_attr->mr_mode == FI_MR_BASIC);
	fi_freeinfo(i);
	h->domain_attr->mr_mode = FI_MR_LOCAL;
	CHECK_RC(getinfo_checked(FI_VERSION(1, 0), h, NULL), -FI_ENODATA);
	h->domain_attr->mr_mode = 0;
	h->domain_attr->mr_key_size = 16;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->domain_attr->mr_key_size = 0;
	h->caps = FI_MSG;

	/* Version: newer than the library's: refused (by the core, -FI_ENOSYS). */
	int vrc = fi_getinfo(FI_VERSION(1, 18), NULL, NULL, 0, h, &i);
	CHECK(vrc == -FI_ENOSYS || vrc == -FI_ENODATA);
	OK(getinfo_checked(FI_VERSION(1, 5), h, NULL));

	/* addr_format: every supported one is answered in kind; others are not. */
	uint32_t fmts[] = { FI_SOCKADDR_IN, FI_SOCKADDR_IN6, FI_ADDR_STR };
	for (size_t k = 0; k < sizeof(fmts) / sizeof(fmts[0]); k++) {
		h->addr_format = fmts[k];
		OK(getinfo_checked(V, h, &i));
		CHECK(i->src_addr && i->src_addrlen > 0);
		fi_freeinfo(i);
	}
	h->addr_format = FI_SOCKADDR;
	OK(getinfo_checked(V, h, &i));
	CHECK(((struct sockaddr *)i->src_addr)->sa_family == AF_INET);
	fi_freeinfo(i);
	h->addr_format = FI_SOCKADDR_IB;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->addr_format = FI_ADDR_PSMX2;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->addr_format = FI_FORMAT_UNSPEC;

	/* Threading, tag format, contexts, protocol, cq data, ordered sizes. */
	h->domain_attr->threading = FI_THREAD_DOMAIN;
	OK(getinfo_checked(V, h, NULL));
	h->domain_attr->threading = 0;
	h->caps = FI_TAGGED;
	h->ep_attr->mem_tag_format = 0xffff;
	OK(getinfo_checked(V, h, NULL));
	h->ep_attr->mem_tag_format = 0;
	h->caps = FI_MSG;
	h->ep_attr->tx_ctx_cnt = 2;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->ep_attr->tx_ctx_cnt = FI_SHARED_CONTEXT;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->ep_attr->tx_ctx_cnt = 0;
	h->ep_attr->protocol = FI_PROTO_SOCK_TCP;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->ep_attr->protocol = FI_PROTO_UNSPEC;
	h->domain_attr->cq_data_size = 16;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->domain_attr->cq_data_size = 0;
	h->ep_attr->max_order_waw_size = 64;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->ep_attr->max_order_waw_size = 0;
	h->domain_attr->data_progress = FI_PROGRESS_AUTO;
	CHECK_RC(getinfo_checked(V, h, NULL), -FI_ENODATA);
	h->domain_attr->data_progress = FI_PROGRESS_MANUAL;
	OK(getinfo_checked(V, h, NULL));

	close_side(&keep);
	fi_freeinfo(h);
	printf("hints: ok\n");
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && strcmp(argv[1], "rdm-server") == 0)
		rdm_server(argv[2]);
	else if (argc == 4 && strcmp(argv[1], "rdm-client") == 0)
		rdm_client(argv[2], argv[3]);
	else if (argc == 3 && strcmp(argv[1], "msg-server") == 0)
		msg_server(argv[2]);
	else if (argc == 4 && strcmp(argv[1], "msg-client") == 0)
		msg_client(argv[2], argv[3]);
	else if (argc == 2 && strcmp(argv[1], "addr") == 0)
		addr_suite();
	else if (argc == 2 && strcmp(argv[1], "hints") == 0)
		hints_suite();
	else if (argc == 3 && strcmp(argv[1], "hosts") == 0)
		hosts_suite(argv[2]);
	else {
		fprintf(stderr, "usage: %s rdm-server PORT | rdm-client HOST PORT | msg-server PORT |"
				" msg-client HOST PORT | addr | hints | hosts OTHER_IP\n",
			argv[0]);
		return 2;
	}
	return 0;
}
