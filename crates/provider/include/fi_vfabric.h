/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * fi_vfabric.h: extensions of the vfabric libfabric provider (libvfabric-fi.so), reached with
 * fi_open_ops. Installed beside the provider (scripts/provider-link.sh copies it to
 * target/<profile>/prov/). See docs/fi_vfabric.7.md.
 */
#ifndef FI_VFABRIC_H
#define FI_VFABRIC_H

#include <stddef.h>
#include <stdint.h>
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_rma.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Vendor ops of a vfabric domain, version 1:
 *   struct fi_vfabric_domain_ops_v1 *ops;
 *   fi_open_ops(&domain->fid, FI_VFABRIC_DOMAIN_OPS_V1, 0, (void **)&ops, NULL);
 * Any other name answers -FI_ENOSYS. */
#define FI_VFABRIC_DOMAIN_OPS_V1 "fi_vfabric_domain_ops_v1"

/* The vendor id of vfabricd's attributes (ASCII "VF"). */
#define FI_VFABRIC_VENDOR_ID 0x5646

enum fi_vfabric_attr_type {
	FI_VFABRIC_ATTR_U64 = 0,
	FI_VFABRIC_ATTR_BOOL = 1,
	FI_VFABRIC_ATTR_STR = 2,
	FI_VFABRIC_ATTR_BYTES = 3,
};

/* One vendor-specific attribute of the device (a QUERY_CAPS entry whose vendor is not 0). */
struct fi_vfabric_attr {
	uint32_t vendor;      /* vendor id (FI_VFABRIC_VENDOR_ID for vfabricd's own) */
	uint16_t key;         /* key within the vendor's namespace */
	uint16_t type;        /* enum fi_vfabric_attr_type */
	char name[32];        /* NUL-terminated, truncated */
	uint64_t value;       /* U64 and BOOL */
	char text[128];       /* STR (NUL-terminated, truncated); BYTES in hexadecimal */
};

/* The counters vfabricd keeps for the device since it started (all guests that used it). */
struct fi_vfabric_counters {
	uint64_t messages_sent;
	uint64_t messages_received;
	uint64_t bytes_copied;
	uint64_t disconnects;
	uint64_t bad_chains;
	uint64_t ring_errors;
	uint64_t dgram_drops;
	uint64_t error_completions;
	uint64_t persisted_ranges; /* persistent-memory ranges made durable (FI_RMA_PMEM) */
	uint64_t persisted_bytes;  /* and their bytes */
};

struct fi_vfabric_domain_ops_v1 {
	size_t size; /* sizeof(struct fi_vfabric_domain_ops_v1) */
	/* Read the device's vendor attributes afresh. In: *count = room in attrs (attrs may be
	 * NULL with *count 0). Out: *count = how many the device has. Returns 0, or -FI_ETOOSMALL
	 * (nothing written) when they do not fit, -FI_ENOSYS when the device offers none. */
	int (*vendor_attrs)(struct fid_domain *domain, struct fi_vfabric_attr *attrs,
			    size_t *count);
	/* Read the device's counters. Returns 0 or a negative libfabric error. */
	int (*counters)(struct fid_domain *domain, struct fi_vfabric_counters *counters);
};

/* Persistent memory (FI_RMA_PMEM; docs/spec.md §6.17).
 *
 * fi_mr_reg/fi_mr_regattr with the FI_RMA_PMEM flag register a buffer the application mapped
 * MAP_SHARED from a regular file (one iov); the provider finds the file in /proc/self/maps and
 * the device persists its ranges with libpmem2. Anonymous or private memory: -FI_EINVAL.
 *
 * FI_SAVE (proposed in ofiwg/libfabric#5874; in no libfabric release): an fi_writemsg flag.
 * The write moves no data (iov_count 0 or empty iovs); the ranges of msg->rma_iov are brought
 * to the completion level the flags carry: FI_SAVE | FI_COMMIT_COMPLETE persists them
 * (persistent regions only, else the completion fails with FI_EACCES); FI_SAVE alone or with
 * FI_DELIVERY_COMPLETE is a visibility flush. Zero-length ranges are valid. */
#ifndef FI_SAVE
#define FI_SAVE (1ULL << 32)
#endif

/* Endpoint ops, version 1:
 *   struct fi_vfabric_ep_ops_v1 *ops;
 *   fi_open_ops(&ep->fid, FI_VFABRIC_EP_OPS_V1, 0, (void **)&ops, NULL);
 * Any other name answers -FI_ENOSYS. */
#define FI_VFABRIC_EP_OPS_V1 "fi_vfabric_ep_ops_v1"

struct fi_vfabric_ep_ops_v1 {
	size_t size; /* sizeof(struct fi_vfabric_ep_ops_v1) */
	/* The commit operation of ofiwg/libfabric PR #5875: persist count ranges at dest_addr.
	 * flags: FI_DELIVERY_COMPLETE makes it a visibility commit (default: FI_COMMIT_COMPLETE);
	 * FI_FENCE, FI_COMPLETION as for fi_writemsg. Completes on the transmit CQ with
	 * FI_RMA | FI_WRITE and len 0; FI_EACCES in fi_cq_readerr for a region that is not
	 * persistent or lacks FI_REMOTE_WRITE, a range outside it or an unknown key. */
	ssize_t (*commit)(struct fid_ep *ep, const struct fi_rma_iov *rma_iov, size_t count,
			  fi_addr_t dest_addr, uint64_t flags, void *context);
};

/* Endpoint ops, version 2: version 1's commit, then the target commit handler (docs/spec.md
 * §6.17.3; the fi_eq_event_handler idea of ofiwg/libfabric#5874, which published no signature).
 *   struct fi_vfabric_ep_ops_v2 *ops;
 *   fi_open_ops(&ep->fid, FI_VFABRIC_EP_OPS_V2, 0, (void **)&ops, NULL);
 * FI_VFABRIC_EP_OPS_V1 keeps answering the version 1 struct. */
#define FI_VFABRIC_EP_OPS_V2 "fi_vfabric_ep_ops_v2"

/* One commit (fi_commit, or fi_writemsg with FI_SAVE | FI_COMMIT_COMPLETE) an initiator made
 * to persistent regions of this domain. The ranges are durable when the handler runs. Valid for
 * the duration of the call only. */
struct fi_vfabric_commit_event {
	uint64_t flags;                   /* FI_COMMIT_COMPLETE; FI_SAVE, FI_REMOTE_CQ_DATA,
					   * FI_FENCE as the initiator set them */
	uint64_t data;                    /* remote CQ data (with FI_REMOTE_CQ_DATA), else 0 */
	size_t count;                     /* entries of rma_iov */
	const struct fi_rma_iov *rma_iov; /* the committed ranges: addr, len, key */
	uint8_t src_addr[16];             /* the initiator (fi_getname format: fi_av_insert it) */
	size_t src_addrlen;               /* 16 */
	uint64_t event_id;                /* the device's id of the event (informative) */
};

/* Returns 0 to accept the commit. Any other value refuses it: the initiator's completion fails
 * with err FI_EIO, prov_errno 16 (VIRTIO_FABRIC_S_COMMIT_REFUSED) and the value, sign-extended,
 * in fi_cq_err_entry.data. */
typedef int (*fi_vfabric_commit_handler)(const struct fi_vfabric_commit_event *event,
					 void *context);

struct fi_vfabric_ep_ops_v2 {
	size_t size; /* sizeof(struct fi_vfabric_ep_ops_v2) */
	ssize_t (*commit)(struct fid_ep *ep, const struct fi_rma_iov *rma_iov, size_t count,
			  fi_addr_t dest_addr, uint64_t flags, void *context); /* as in v1 */
	/* Install (handler NULL: remove) the commit handler of ep's domain. Regions registered
	 * with FI_RMA_PMEM on the domain afterwards are handled: a commit at FI_COMMIT_COMPLETE to
	 * one of them is persisted by the device, then waits until the handler has run — from the
	 * domain's progress (fi_cq_read and the like, on any of the domain's objects), on the
	 * thread that drives it, one event at a time — and completes with the handler's verdict.
	 * If the target does not progress within vfabricd's --commit-timeout-ms (default 5000),
	 * the initiator's completion fails with FI_ETIMEDOUT (prov_errno 17); if the target
	 * endpoint closes or its process dies first, with FI_EHOSTUNREACH (PEER_GONE). Events of
	 * handled regions arriving while no handler is installed are accepted. Needs FI_RMA_PMEM
	 * in the endpoint's caps (else -FI_EOPNOTSUPP). Returns 0 or a negative error. */
	int (*set_commit_handler)(struct fid_ep *ep, fi_vfabric_commit_handler handler,
				  void *context);
};

/* Registration cache of a domain (docs/fi_vfabric.7.md, "Registration cache"):
 *   struct fi_vfabric_mr_cache_ops_v1 *ops;
 *   fi_open_ops(&domain->fid, FI_VFABRIC_MR_CACHE_OPS_V1, 0, (void **)&ops, NULL);
 * Its memory monitor is the provider's userfaultfd monitor, or the application's
 * struct fid_mem_monitor (rdma/fi_ext.h) imported with
 *   fi_import_fid(&domain->fid, &monitor->fid, 0);
 * before the domain holds registrations in use (-FI_EBUSY otherwise, or when one was imported
 * already; -FI_EINVAL for a short export_ops or one without subscribe, unsubscribe, valid).
 * The provider fills monitor->import_ops; the application calls
 * monitor->import_ops->notify(monitor, addr, len) when memory is unmapped or freed. */
#define FI_VFABRIC_MR_CACHE_OPS_V1 "fi_vfabric_mr_cache_ops_v1"

struct fi_vfabric_mr_cache_stats {
	uint64_t hits;          /* registrations served from the cache */
	uint64_t misses;        /* cacheable registrations made with the device */
	uint64_t entries;       /* entries now */
	uint64_t bytes;         /* bytes of the entries now */
	uint64_t in_use;        /* entries now held by open MRs */
	uint64_t evictions;     /* unused entries evicted for room (LRU) */
	uint64_t invalidations; /* entries dropped because their memory was unmapped/freed */
	uint64_t uncached;      /* misses not kept (cache off, memory not watchable, all in use) */
	uint64_t max_count;     /* FI_VFABRIC_MR_CACHE_MAX_COUNT in effect */
	uint64_t max_size;      /* FI_VFABRIC_MR_CACHE_MAX_SIZE in effect */
};

struct fi_vfabric_mr_cache_ops_v1 {
	size_t size; /* sizeof(struct fi_vfabric_mr_cache_ops_v1) */
	/* Read the counters (pending monitor events are processed first). 0 or -FI_EINVAL. */
	int (*stats)(struct fid_domain *domain, struct fi_vfabric_mr_cache_stats *stats);
	/* Drop every entry no MR holds; returns how many. */
	ssize_t (*flush)(struct fid_domain *domain);
};

#ifdef __cplusplus
}
#endif

#endif /* FI_VFABRIC_H */
