/* Block requests per process (tgid), per cgroup2 id and per device.
 *
 * At block_rq_issue the request is charged to `current` (the submitter, or
 * the kworker that dispatched on its behalf) and remembered by
 * (device, sector).  block_rq_complete runs in interrupt context, where
 * `current` means nothing: it only looks the request up and adds its service
 * time (issue -> complete) to the owner recorded at issue.
 *
 * `current` at block_rq_issue is the submitter only when the request is issued
 * directly.  Requests held in a plug that is flushed when the submitter sleeps
 * (Debian 6.1's O_DIRECT writes to a block device: blkdev_write_iter plugs,
 * then waits) are issued by kblockd, a kworker in the root cgroup.  So, where
 * the kernel has it, block_getrq (request allocation, always in the
 * submitter's context) records the owner by start sector, and block_rq_issue
 * takes it from there (RSWAP_OWNER_AT_GETRQ).  The key is the sector alone:
 * getrq reports a partition's dev_t, issue the whole disk's, and both carry
 * the absolute sector.
 *
 * Only tracepoint arguments (args->dev, ->sector, ->bytes, ->rwbs) are read;
 * bcc builds their layout from tracefs' format file of the running kernel.
 */
#include <uapi/linux/ptrace.h>
#include "rswap.h"

#ifndef RSWAP_MAX_INFLIGHT
#define RSWAP_MAX_INFLIGHT 10240
#endif

struct io_key {
    u64 id;      /* tgid (task map) or cgroup2 id (cgroup map) */
    u32 dev;     /* kernel dev_t: major << 20 | minor */
    u32 pad;
};

struct io_val {
    u64 reads;
    u64 writes;
    u64 other;         /* flush, discard, no-data */
    u64 read_bytes;
    u64 write_bytes;
    u64 completed;
    u64 service_ns;
};

struct inflight_key {
    u64 sector;
    u32 dev;
    u32 pad;
};

struct inflight_val {
    u64 issued_ns;
    u64 cgid;
    u32 tgid;
    u32 pad;
};

struct owner_val {
    u64 cgid;
    u32 tgid;
    u32 pad;
};

BPF_PERCPU_HASH(rswap_io_task, struct io_key, struct io_val, RSWAP_MAX_TASKS);
BPF_PERCPU_HASH(rswap_io_cgroup, struct io_key, struct io_val, RSWAP_MAX_CGROUPS);
BPF_HASH(rswap_io_inflight, struct inflight_key, struct inflight_val, RSWAP_MAX_INFLIGHT);
BPF_PERCPU_ARRAY(rswap_io_stats, u64, RSWAP_STAT_MAX);
#ifdef RSWAP_OWNER_AT_GETRQ
/* LRU: a request whose start sector changed before issue (a front merge)
 * leaves its entry behind, and the oldest such entries make room. */
BPF_TABLE("lru_hash", u64, struct owner_val, rswap_io_owner, RSWAP_MAX_INFLIGHT);
#endif

static __always_inline void bump_stat(int idx)
{
    u64 *v = rswap_io_stats.lookup(&idx);
    if (v)
        (*v)++;
}

/* 0 read, 1 write, 2 other, from rwbs ("R", "WS", "FWFS", "D", "N"...). */
static __always_inline int rw_kind(char c0, char c1)
{
    char c = c0 == 'F' ? c1 : c0;
    if (c == 'R')
        return 0;
    if (c == 'W')
        return 1;
    return 2;
}

static __always_inline void add_issue(struct io_val *v, int kind, u64 bytes)
{
    if (kind == 0) {
        v->reads++;
        v->read_bytes += bytes;
    } else if (kind == 1) {
        v->writes++;
        v->write_bytes += bytes;
    } else {
        v->other++;
    }
}

/* One function per map: bcc rewrites `map.lookup()` only where the map is
 * named, so a map cannot be handed to a shared helper as a pointer. */
static __always_inline void issue_task(struct io_key *key, int kind, u64 bytes)
{
    struct io_val *v = rswap_io_task.lookup(key);
    if (v) {
        add_issue(v, kind, bytes);
        return;
    }
    struct io_val init = {};
    add_issue(&init, kind, bytes);
    if (rswap_io_task.insert(key, &init) != 0) {
        v = rswap_io_task.lookup(key);   /* raced with another CPU's insert */
        if (v)
            add_issue(v, kind, bytes);
        else
            bump_stat(RSWAP_STAT_TASK_FULL);
    }
}

static __always_inline void issue_cgroup(struct io_key *key, int kind, u64 bytes)
{
    struct io_val *v = rswap_io_cgroup.lookup(key);
    if (v) {
        add_issue(v, kind, bytes);
        return;
    }
    struct io_val init = {};
    add_issue(&init, kind, bytes);
    if (rswap_io_cgroup.insert(key, &init) != 0) {
        v = rswap_io_cgroup.lookup(key);   /* raced with another CPU's insert */
        if (v)
            add_issue(v, kind, bytes);
        else
            bump_stat(RSWAP_STAT_CGROUP_FULL);
    }
}

static __always_inline void complete_task(struct io_key *key, u64 ns)
{
    struct io_val *v = rswap_io_task.lookup(key);
    if (v) {
        v->completed++;
        v->service_ns += ns;
        return;
    }
    struct io_val init = {.completed = 1, .service_ns = ns};
    rswap_io_task.insert(key, &init);
}

static __always_inline void complete_cgroup(struct io_key *key, u64 ns)
{
    struct io_val *v = rswap_io_cgroup.lookup(key);
    if (v) {
        v->completed++;
        v->service_ns += ns;
        return;
    }
    struct io_val init = {.completed = 1, .service_ns = ns};
    rswap_io_cgroup.insert(key, &init);
}

TRACEPOINT_PROBE(block, block_rq_issue)
{
    u32 dev = args->dev;
    int kind = rw_kind(args->rwbs[0], args->rwbs[1]);
#ifdef RSWAP_RQ_NO_BYTES
    u64 bytes = (u64)args->nr_sector << 9;
#else
    u64 bytes = args->bytes;
#endif
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 cgid = bpf_get_current_cgroup_id();
#ifdef RSWAP_OWNER_AT_GETRQ
    u64 start = args->sector;
    struct owner_val *o = rswap_io_owner.lookup(&start);
    if (o) {
        tgid = o->tgid;
        cgid = o->cgid;
        rswap_io_owner.delete(&start);
    }
#endif

    struct io_key tk = {.id = tgid, .dev = dev};
    issue_task(&tk, kind, bytes);
    struct io_key ck = {.id = cgid, .dev = dev};
    issue_cgroup(&ck, kind, bytes);

    struct inflight_key ik = {.sector = args->sector, .dev = dev};
    struct inflight_val iv = {.issued_ns = bpf_ktime_get_ns(), .cgid = cgid, .tgid = tgid};
    rswap_io_inflight.update(&ik, &iv);
    return 0;
}

#ifdef RSWAP_OWNER_AT_GETRQ
TRACEPOINT_PROBE(block, block_getrq)
{
    u64 start = args->sector;
    struct owner_val o = {.cgid = bpf_get_current_cgroup_id(),
                          .tgid = bpf_get_current_pid_tgid() >> 32};
    rswap_io_owner.update(&start, &o);
    return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_complete)
{
    struct inflight_key ik = {.sector = args->sector, .dev = args->dev};
    struct inflight_val *iv = rswap_io_inflight.lookup(&ik);
    if (!iv)
        return 0;          /* issued before we attached, or a partial completion */
    u64 ns = bpf_ktime_get_ns() - iv->issued_ns;
    struct io_key tk = {.id = iv->tgid, .dev = ik.dev};
    struct io_key ck = {.id = iv->cgid, .dev = ik.dev};
    rswap_io_inflight.delete(&ik);
    if (ns > RSWAP_MAX_DELTA_NS) {
        bump_stat(RSWAP_STAT_STALE);
        return 0;
    }
    complete_task(&tk, ns);
    complete_cgroup(&ck, ns);
    return 0;
}
