/* Shared definitions between rswap's BPF programs and their Python loaders.
 *
 * Only tracepoint arguments and BPF helpers are used: the kernel headers bcc
 * compiles against may belong to another kernel version, so struct field
 * offsets cannot be trusted.
 */
#ifndef RSWAP_H
#define RSWAP_H

/* A delta larger than this (10 s) means the per-CPU start stamp was stale
 * (CPU hot-plugged, program just attached): it is dropped, not charged. */
#ifndef RSWAP_MAX_DELTA_NS
#define RSWAP_MAX_DELTA_NS 10000000000ULL
#endif

#ifndef RSWAP_MAX_TASKS
#define RSWAP_MAX_TASKS 16384
#endif

/* Processes accounted by tgid as well as by cgroup (tasks configured by pid). */
#ifndef RSWAP_MAX_WATCHED
#define RSWAP_MAX_WATCHED 16384
#endif

#ifndef RSWAP_MAX_CGROUPS
#define RSWAP_MAX_CGROUPS 4096
#endif

/* Cgroups each CPU keeps a running sum for before it touches a hash (a power of two). */
#ifndef RSWAP_CPU_SLOTS
#define RSWAP_CPU_SLOTS 4
#endif

/* sched:sched_switch reports a preempted task's prev_state as TASK_REPORT_MAX, a running one as 0 */
#define RSWAP_TASK_REPORT_MAX 0x100

/* Index of the overflow counters in the `rswap_stats` array. */
#define RSWAP_STAT_TASK_FULL 0
#define RSWAP_STAT_CGROUP_FULL 1
#define RSWAP_STAT_STALE 2
#define RSWAP_STAT_MAX 3

/* ---- Run-queue delay (runq.bpf.c alone, or cpu.bpf.c built with -DRSWAP_RUNQ) ----------------
 *
 * The wakeup stamps a task's pid and time into a plain array indexed by the pid's low bits
 * (RSWAP_RUNQ_STAMPS entries, direct-mapped: no hash operation); the task's delay is read at
 * its next switch *out*, where it is `current` (so bpf_get_current_cgroup_id() is its cgroup
 * and bpf_get_current_pid_tgid() its pid, no task_struct field and no next_pid needed), as the
 * time from that stamp to when this CPU last switched (it switched in then).  A stamp is one
 * u64 (pid in the low 22 bits, PID_MAX_LIMIT being 2^22; the time's low 42 bits above, which
 * wrap every 73 minutes), so a wakeup on another CPU can never tear it.  Two tasks whose pids
 * share the low bits and wait at once keep only the later stamp: the earlier delay is lost
 * (counted in stamp_overwritten).  A wait is lost more often the longer it is, so a host with
 * thousands of runnable tasks under-counts its longest delays by about runnable/STAMPS.
 */
#ifdef RSWAP_RUNQ

#ifndef RSWAP_RUNQ_SLOTS
#define RSWAP_RUNQ_SLOTS 26          /* 2^25 us = 33 s: everything above lands in the top slot */
#endif
#ifndef RSWAP_RUNQ_STAMPS
#define RSWAP_RUNQ_STAMPS 16384      /* a power of two */
#endif
#define RSWAP_RUNQ_PID_BITS 22
#define RSWAP_RUNQ_PID_MASK ((1ULL << RSWAP_RUNQ_PID_BITS) - 1)

#define RSWAP_RUNQ_STAT_OVERWRITTEN 0
#define RSWAP_RUNQ_STAT_HIST_FULL 1
#define RSWAP_RUNQ_STAT_MAX 2

struct rswap_runq_key {
    u64 cgroup_id;
    u64 slot;                         /* bpf_log2l(delay in us): below 2^slot us */
};

BPF_ARRAY(rswap_runq_stamp, u64, RSWAP_RUNQ_STAMPS);
BPF_PERCPU_HASH(rswap_runq_hist, struct rswap_runq_key, u64, RSWAP_MAX_CGROUPS * 8);
BPF_PERCPU_HASH(rswap_runq_ns, u64, u64, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_runq_stats, u64, RSWAP_RUNQ_STAT_MAX);

static __always_inline void runq_stat(int idx)
{
    u64 *v = rswap_runq_stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline u64 *runq_stamp_of(u32 pid)
{
    if (pid == 0 || pid > RSWAP_RUNQ_PID_MASK)
        return NULL;
    u32 idx = pid & (RSWAP_RUNQ_STAMPS - 1);
    return rswap_runq_stamp.lookup(&idx);
}

/* `pid` is runnable from `now`: stamp it, counting a pending stamp of another pid it replaces */
static __always_inline void runq_stamp_now(u64 *s, u32 pid, u64 now)
{
    u64 old = *s;
    if (old != 0 && (old & RSWAP_RUNQ_PID_MASK) != pid)
        runq_stat(RSWAP_RUNQ_STAT_OVERWRITTEN);
    *s = (now << RSWAP_RUNQ_PID_BITS) | pid;
}

static __always_inline void runq_enqueued(u32 pid)
{
    u64 *s = runq_stamp_of(pid);
    if (s)
        runq_stamp_now(s, pid, bpf_ktime_get_ns());
}

/* `pid` (current) switches out at `now`; this CPU switched it in at `in_ts`.  The delay it
 * waited before `in_ts` (0: none stamped, or the stamp came while it ran, or is stale); a task
 * still runnable is stamped again, it waits on the queue from now. */
static __always_inline u64 runq_switch_out(u32 pid, int runnable, u64 in_ts, u64 now)
{
    u64 *s = runq_stamp_of(pid);
    if (!s)
        return 0;
    u64 v = *s, delay = 0;
    int mine = v != 0 && (v & RSWAP_RUNQ_PID_MASK) == pid;
    if (mine) {
        /* modulo 2^42 ns: a stamp later than in_ts comes out huge and is dropped */
        delay = ((in_ts << RSWAP_RUNQ_PID_BITS) - (v & ~RSWAP_RUNQ_PID_MASK)) >> RSWAP_RUNQ_PID_BITS;
        if (in_ts == 0 || delay > RSWAP_MAX_DELTA_NS || delay == 0)
            delay = 0;
    }
    if (runnable)
        runq_stamp_now(s, pid, now);
    else if (mine)
        *s = 0;
    return delay;
}

static __always_inline u32 runq_bucket(u64 delay_ns)
{
    u32 b = bpf_log2l(delay_ns / 1000);
    return b >= RSWAP_RUNQ_SLOTS ? RSWAP_RUNQ_SLOTS - 1 : b;
}

static __always_inline void runq_add(u64 cgid, u32 bucket, u64 count, u64 ns)
{
    if (count == 0)
        return;
    struct rswap_runq_key key = {.cgroup_id = cgid, .slot = bucket};
    u64 *n = rswap_runq_hist.lookup(&key);
    if (n)
        *n += count;
    else if (rswap_runq_hist.update(&key, &count) != 0)
        runq_stat(RSWAP_RUNQ_STAT_HIST_FULL);
    if (ns == 0)
        return;
    u64 *sum = rswap_runq_ns.lookup(&cgid);
    if (sum)
        *sum += ns;
    else if (rswap_runq_ns.update(&cgid, &ns) != 0)
        runq_stat(RSWAP_RUNQ_STAT_HIST_FULL);
}

#endif /* RSWAP_RUNQ */

#endif
