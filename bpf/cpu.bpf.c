/* On-CPU time per process (tgid) and per cgroup2 id.
 *
 * Each CPU remembers when it last switched.  At every sched_switch the time
 * since then is charged to the task switching out, which is `current` while
 * the tracepoint runs, so no task_struct field is read and no per-thread
 * start-time entry can go stale.  A low-rate software perf event (the
 * "flush") charges the running task the same way, so a busy loop that is
 * never switched out still shows up every interval.
 */
#include <uapi/linux/ptrace.h>
#include "rswap.h"

BPF_PERCPU_ARRAY(rswap_cpu_start, u64, 1);
BPF_PERCPU_HASH(rswap_task_ns, u32, u64, RSWAP_MAX_TASKS);
BPF_PERCPU_HASH(rswap_cgroup_ns, u64, u64, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_stats, u64, RSWAP_STAT_MAX);

static __always_inline void bump_stat(int idx)
{
    u64 *v = rswap_stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void charge_current(void)
{
    int zero = 0;
    u64 now = bpf_ktime_get_ns();
    u64 *start = rswap_cpu_start.lookup(&zero);
    if (!start)
        return;
    u64 last = *start;
    *start = now;
    if (last == 0)
        return;
    u64 delta = now - last;
    if (delta > RSWAP_MAX_DELTA_NS) {
        bump_stat(RSWAP_STAT_STALE);
        return;
    }
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid == 0)          /* the idle task */
        return;

    u64 init = 0;
    u64 *t = rswap_task_ns.lookup(&tgid);
    if (!t) {
        if (rswap_task_ns.update(&tgid, &delta) != 0)
            bump_stat(RSWAP_STAT_TASK_FULL);
    } else {
        *t += delta;
    }

    u64 cgid = bpf_get_current_cgroup_id();
    u64 *c = rswap_cgroup_ns.lookup(&cgid);
    if (!c) {
        if (rswap_cgroup_ns.update(&cgid, &delta) != 0)
            bump_stat(RSWAP_STAT_CGROUP_FULL);
    } else {
        *c += delta;
    }
}

#ifdef RSWAP_RAW_TP
RAW_TRACEPOINT_PROBE(sched_switch)
{
    charge_current();
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
    charge_current();
    return 0;
}
#endif

int rswap_cpu_flush(struct bpf_perf_event_data *ctx)
{
    charge_current();
    return 0;
}
