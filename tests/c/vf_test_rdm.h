/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Set-up shared by the small C tests of the vfabric provider (vf_ext_test.c, vf_log_test.c,
 * vf_pmem_test.c, vf_commit_handler_test.c):
 * a check macro and one enabled RDM endpoint with its fabric, domain, AV and CQ.
 */
#ifndef VF_TEST_RDM_H
#define VF_TEST_RDM_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>

#include "vf_check.h"

struct rdm {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_ep *ep;
};

/* Fabric and domain of the first vfabric RDM device offering `caps` with `mr_mode`. */
static inline void rdm_open_domain_with(struct rdm *r, uint64_t caps, int mr_mode)
{
	struct fi_info *hints = fi_allocinfo();
	CHECK(hints);
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = caps;
	hints->domain_attr->mr_mode = mr_mode;
	hints->fabric_attr->prov_name = strdup("vfabric");
	CHECK(fi_getinfo(FI_VERSION(1, 17), NULL, NULL, 0, hints, &r->info) == 0);
	fi_freeinfo(hints);
	CHECK(fi_fabric(r->info->fabric_attr, &r->fabric, NULL) == 0);
	CHECK(fi_domain(r->fabric, r->info, &r->domain, NULL) == 0);
}

/* Fabric and domain of the first vfabric RDM device (FI_MSG). */
static inline void rdm_open_domain(struct rdm *r)
{
	rdm_open_domain_with(r, FI_MSG, 0);
}

/* An enabled endpoint of the domain, with a table AV and one CQ for both directions. */
static inline void rdm_open_ep(struct rdm *r)
{
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	CHECK(fi_av_open(r->domain, &av_attr, &r->av, NULL) == 0);
	struct fi_cq_attr cq_attr = { .format = FI_CQ_FORMAT_CONTEXT, .size = 16 };
	CHECK(fi_cq_open(r->domain, &cq_attr, &r->cq, NULL) == 0);
	CHECK(fi_endpoint(r->domain, r->info, &r->ep, NULL) == 0);
	CHECK(fi_ep_bind(r->ep, &r->av->fid, 0) == 0);
	CHECK(fi_ep_bind(r->ep, &r->cq->fid, FI_TRANSMIT | FI_RECV) == 0);
	CHECK(fi_enable(r->ep) == 0);
}

/* The endpoint's own address inserted into its AV (operations on itself). */
static inline fi_addr_t rdm_self(struct rdm *r)
{
	char name[64];
	size_t len = sizeof(name);
	fi_addr_t me;
	CHECK(fi_getname(&r->ep->fid, name, &len) == 0);
	CHECK(len == 16);
	CHECK(fi_av_insert(r->av, name, 1, &me, 0, NULL) == 1);
	return me;
}

static inline void rdm_close(struct rdm *r)
{
	fi_close(&r->ep->fid);
	fi_close(&r->cq->fid);
	fi_close(&r->av->fid);
	fi_close(&r->domain->fid);
	fi_close(&r->fabric->fid);
	fi_freeinfo(r->info);
}

#endif /* VF_TEST_RDM_H */
