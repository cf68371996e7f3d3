/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * fi_import_log with the vfabric provider: a consumer's logger receives the provider's
 * messages (provider name, level, subsystem, function, line, text), FI_LOG_LEVEL filtering
 * still applies (the logger leaves `enabled` to the core), and closing the import restores the
 * core's own logging. Built and run by tests/provider.rs with FI_PROVIDER_PATH and
 * VFABRIC_DEVICES set.
 *
 *   vf_log_test <warn | info | debug>   (set as FI_LOG_LEVEL before libfabric starts)
 *
 * Messages provoked: an address of another fabric inserted into an AV (warn, av), a domain
 * opened (info, domain), a send to an fi_addr that is not in the AV (debug, ep_data).
 */
#include <rdma/fi_ext.h>
#include "vf_test_rdm.h"

struct seen {
	enum fi_log_level level;
	enum fi_log_subsys subsys;
	char prov[32];
	char func[64];
	int line;
	char msg[256];
};

static struct seen seen[256];
static int nseen;

static void capture(const struct fi_provider *prov, enum fi_log_level level,
		    enum fi_log_subsys subsys, const char *func, int line, const char *msg)
{
	if (nseen == (int)(sizeof(seen) / sizeof(seen[0])))
		return;
	struct seen *s = &seen[nseen++];
	s->level = level;
	s->subsys = subsys;
	snprintf(s->prov, sizeof(s->prov), "%s", prov && prov->name ? prov->name : "");
	snprintf(s->func, sizeof(s->func), "%s", func ? func : "");
	s->line = line;
	snprintf(s->msg, sizeof(s->msg), "%s", msg ? msg : "");
}

static struct fi_ops_log log_ops = {
	.size = sizeof(struct fi_ops_log),
	.enabled = NULL, /* the core's FI_LOG_LEVEL / FI_LOG_SUBSYS filtering */
	.ready = NULL,
	.log = capture,
};
static struct fid_logging logger = { .ops = &log_ops };

/* How many captured vfabric messages of `level` and `subsys` contain `text`; each must name
 * a function and a line. */
static int count(enum fi_log_level level, enum fi_log_subsys subsys, const char *text)
{
	int n = 0;
	for (int i = 0; i < nseen; i++) {
		struct seen *s = &seen[i];
		if (strcmp(s->prov, "vfabric") || s->level != level || s->subsys != subsys ||
		    !strstr(s->msg, text))
			continue;
		CHECK(s->func[0] != '\0' && s->line > 0);
		n++;
	}
	return n;
}

static void provoke(void)
{
	struct rdm r;
	rdm_open_domain(&r);
	rdm_open_ep(&r);

	/* Our own address with the fabric id (bytes 4..7 of the node) changed. */
	unsigned char name[16];
	size_t len = sizeof(name);
	CHECK(fi_getname(&r.ep->fid, name, &len) == 0 && len == 16);
	name[4] ^= 0x5a;
	fi_addr_t fa = 0;
	CHECK(fi_av_insert(r.av, name, 1, &fa, 0, NULL) == 0);
	CHECK(fa == FI_ADDR_NOTAVAIL);

	char buf[8] = "payload";
	CHECK(fi_send(r.ep, buf, sizeof(buf), NULL, 12345, NULL) == -FI_EINVAL);

	rdm_close(&r);
}

int main(int argc, char **argv)
{
	CHECK(argc == 2);
	const char *level = argv[1];
	int want_info = !strcmp(level, "info") || !strcmp(level, "debug");
	int want_debug = !strcmp(level, "debug");
	/* The level this run checks, before libfabric initialises (it reads it once). */
	setenv("FI_LOG_LEVEL", level, 1);

	CHECK(fi_import_log(FI_VERSION(1, 17), 0, &logger) == 0);
	provoke();
	CHECK(count(FI_LOG_WARN, FI_LOG_AV, "belongs to fabric") == 1);
	CHECK((count(FI_LOG_INFO, FI_LOG_DOMAIN, "domain open") >= 1) == want_info);
	CHECK((count(FI_LOG_DEBUG, FI_LOG_EP_DATA, "not in the AV") >= 1) == want_debug);
	for (int i = 0; i < nseen; i++)
		printf("%s:%d:%d:%s():%d %s", seen[i].prov, seen[i].level, seen[i].subsys,
		       seen[i].func, seen[i].line, seen[i].msg);

	/* Closing the import gives logging back to the core: nothing more reaches us. */
	CHECK(fi_close(&logger.fid) == 0);
	int before = nseen;
	provoke();
	CHECK(nseen == before);
	printf("log: ok\n");
	return 0;
}
