/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The vfabric provider's vendor ops (fi_vfabric.h): fi_open_ops on a domain returns the
 * versioned ops struct, which reads the device's vendor attributes and its counters (they move
 * when messages move); unknown names answer -FI_ENOSYS. Built and run by tests/provider.rs
 * with -I crates/provider/include, FI_PROVIDER_PATH and VFABRIC_DEVICES set.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include "fi_vfabric.h"

#define CHECK(cond)                                                                  \
	do {                                                                         \
		if (!(cond)) {                                                       \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			exit(1);                                                     \
		}                                                                    \
	} while (0)

static const struct fi_vfabric_attr *find(const struct fi_vfabric_attr *a, size_t n,
					  const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (a[i].vendor == FI_VFABRIC_VENDOR_ID && !strcmp(a[i].name, name))
			return &a[i];
	return NULL;
}

int main(void)
{
	struct fi_info *hints = fi_allocinfo(), *info = NULL;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep;
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = FI_MSG;
	hints->fabric_attr->prov_name = strdup("vfabric");
	CHECK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &info) == 0);
	fi_freeinfo(hints);
	CHECK(fi_fabric(info->fabric_attr, &fabric, NULL) == 0);
	CHECK(fi_domain(fabric, info, &domain, NULL) == 0);

	void *unknown = NULL;
	CHECK(fi_open_ops(&domain->fid, "fi_vfabric_domain_ops_v0", 0, &unknown, NULL) == -FI_ENOSYS);
	struct fi_vfabric_domain_ops_v1 *ops = NULL;
	CHECK(fi_open_ops(&domain->fid, FI_VFABRIC_DOMAIN_OPS_V1, 0, (void **)&ops, NULL) == 0);
	CHECK(ops && ops->size == sizeof(*ops));

	/* Vendor attributes: ask for the count, then read them all. */
	size_t n = 0;
	CHECK(ops->vendor_attrs(domain, NULL, &n) == -FI_ETOOSMALL && n > 0);
	struct fi_vfabric_attr *attrs = calloc(n, sizeof(*attrs));
	CHECK(attrs && ops->vendor_attrs(domain, attrs, &n) == 0);
	const struct fi_vfabric_attr *a = find(attrs, n, "implementation");
	CHECK(a && a->type == FI_VFABRIC_ATTR_STR && !strcmp(a->text, "vfabricd"));
	a = find(attrs, n, "virtio_device_id");
	CHECK(a && a->type == FI_VFABRIC_ATTR_U64 && a->value == 56);
	a = find(attrs, n, "one_copy");
	CHECK(a && a->type == FI_VFABRIC_ATTR_BOOL && a->value == 1);
	CHECK(find(attrs, n, "messages_sent") != NULL);
	free(attrs);

	/* Counters move with traffic: three messages from the endpoint to itself. */
	struct fi_vfabric_counters before, after;
	CHECK(ops->counters(domain, &before) == 0);
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	CHECK(fi_av_open(domain, &av_attr, &av, NULL) == 0);
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT, .size = 16 };
	CHECK(fi_cq_open(domain, &cq_attr, &cq, NULL) == 0);
	CHECK(fi_endpoint(domain, info, &ep, NULL) == 0);
	CHECK(fi_ep_bind(ep, &av->fid, 0) == 0);
	CHECK(fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV) == 0);
	CHECK(fi_enable(ep) == 0);
	char name[64];
	size_t len = sizeof(name);
	fi_addr_t me;
	CHECK(fi_getname(&ep->fid, name, &len) == 0);
	CHECK(fi_av_insert(av, name, 1, &me, 0, NULL) == 1);
	char rbuf[3][100], sbuf[100] = "counted";
	for (int i = 0; i < 3; i++)
		CHECK(fi_recv(ep, rbuf[i], sizeof(rbuf[i]), NULL, FI_ADDR_UNSPEC, NULL) == 0);
	for (int i = 0; i < 3; i++)
		CHECK(fi_send(ep, sbuf, sizeof(sbuf), NULL, me, NULL) == 0);
	struct fi_cq_entry e;
	for (int got = 0, spins = 0; got < 6; spins++) {
		CHECK(spins < 10000000);
		ssize_t r = fi_cq_read(cq, &e, 1);
		CHECK(r == 1 || r == -FI_EAGAIN);
		got += r == 1;
	}
	CHECK(ops->counters(domain, &after) == 0);
	CHECK(after.messages_sent >= before.messages_sent + 3);
	CHECK(after.messages_received >= before.messages_received + 3);
	CHECK(after.bytes_copied >= before.bytes_copied + 3 * sizeof(sbuf));
	CHECK(after.error_completions == before.error_completions);

	fi_close(&ep->fid);
	fi_close(&cq->fid);
	fi_close(&av->fid);
	fi_close(&domain->fid);
	fi_close(&fabric->fid);
	fi_freeinfo(info);
	printf("ext: ok\n");
	return 0;
}
