/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The vfabric provider's vendor ops (fi_vfabric.h): fi_open_ops on a domain returns the
 * versioned ops struct, which reads the device's vendor attributes and its counters (they move
 * when messages move); unknown names answer -FI_ENOSYS. Built and run by tests/provider.rs
 * with -I crates/provider/include, FI_PROVIDER_PATH and VFABRIC_DEVICES set.
 */
#include "vf_test_rdm.h"
#include "fi_vfabric.h"

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
	struct rdm r;
	rdm_open_domain(&r);
	struct fid_domain *domain = r.domain;

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
	rdm_open_ep(&r);
	struct fid_ep *ep = r.ep;
	struct fid_cq *cq = r.cq;
	char name[64];
	size_t len = sizeof(name);
	fi_addr_t me;
	CHECK(fi_getname(&ep->fid, name, &len) == 0);
	CHECK(fi_av_insert(r.av, name, 1, &me, 0, NULL) == 1);
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

	rdm_close(&r);
	printf("ext: ok\n");
	return 0;
}
