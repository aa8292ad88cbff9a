/* Run-queue delay per cgroup2 id: the time from a task becoming runnable (woken, newly
 * created, or preempted while still runnable) to it running, as bcc's runqlat measures it,
 * as a log2 histogram in microseconds per cgroup.
 *
 * Only tracepoint arguments and helpers: no task_struct field is read.  That leaves one
 * problem: bpf_get_current_cgroup_id() names the task running now, and neither event runs as
 * the task whose delay it ends (sched_wakeup runs as the waker or on the wakee's CPU as
 * whatever runs there; sched_switch runs as the task switching *out*).  So the delay computed
 * when a task is switched in is parked per CPU, with its pid, and charged at that CPU's next
 * sched_switch: the task switching out then is the one switched in last time, and `current`
 * is it, so its cgroup id is the helper's answer.  A delay waits on the CPU for at most one
 * time slice before it is charged; the pid check drops it if the CPU ran someone else in
 * between (a context switch the tracepoint did not see).
 */
#include <uapi/linux/ptrace.h>
#include "rswap.h"

#ifndef RSWAP_RUNQ_SLOTS
#define RSWAP_RUNQ_SLOTS 26          /* 2^25 us = 33 s: everything above lands in the top slot */
#endif

#define RSWAP_RUNQ_STAT_START_FULL 0
#define RSWAP_RUNQ_STAT_HIST_FULL 1
#define RSWAP_RUNQ_STAT_MAX 2

struct rswap_runq_key {
    u64 cgroup_id;
    u64 slot;                         /* floor(log2(delay in us)) */
};

struct rswap_runq_parked {
    u32 pid;
    u32 pad;
    u64 delay_ns;
};

/* pid -> when it became runnable; LRU so a pid that exits before running cannot fill it */
BPF_TABLE("lru_hash", u32, u64, rswap_runq_start, RSWAP_MAX_TASKS);
BPF_PERCPU_ARRAY(rswap_runq_parked, struct rswap_runq_parked, 1);
BPF_PERCPU_HASH(rswap_runq_hist, struct rswap_runq_key, u64, RSWAP_MAX_CGROUPS * 8);
BPF_PERCPU_HASH(rswap_runq_ns, u64, u64, RSWAP_MAX_CGROUPS);
BPF_PERCPU_ARRAY(rswap_runq_stats, u64, RSWAP_RUNQ_STAT_MAX);

static __always_inline void runq_stat(int idx)
{
    u64 *v = rswap_runq_stats.lookup(&idx);
    if (v)
        (*v)++;
}

static __always_inline void runq_enqueued(u32 pid)
{
    if (pid == 0)
        return;
    u64 ts = bpf_ktime_get_ns();
    if (rswap_runq_start.update(&pid, &ts) != 0)
        runq_stat(RSWAP_RUNQ_STAT_START_FULL);
}

static __always_inline void runq_charge(u64 cgid, u64 delay_ns)
{
    u64 us = delay_ns / 1000;
    struct rswap_runq_key key = {.cgroup_id = cgid, .slot = bpf_log2l(us)};
    if (key.slot >= RSWAP_RUNQ_SLOTS)
        key.slot = RSWAP_RUNQ_SLOTS - 1;
    u64 one = 1;
    u64 *n = rswap_runq_hist.lookup(&key);
    if (n)
        *n += 1;
    else if (rswap_runq_hist.update(&key, &one) != 0)
        runq_stat(RSWAP_RUNQ_STAT_HIST_FULL);
    u64 *sum = rswap_runq_ns.lookup(&cgid);
    if (sum)
        *sum += delay_ns;
    else if (rswap_runq_ns.update(&cgid, &delay_ns) != 0)
        runq_stat(RSWAP_RUNQ_STAT_HIST_FULL);
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    runq_enqueued(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    runq_enqueued(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    int zero = 0;
    u32 prev = args->prev_pid, next = args->next_pid;
    struct rswap_runq_parked *parked = rswap_runq_parked.lookup(&zero);
    if (!parked)
        return 0;
    /* 1. the task switched in last time is `current`: charge its parked delay to its cgroup */
    if (parked->pid != 0 && parked->pid == prev)
        runq_charge(bpf_get_current_cgroup_id(), parked->delay_ns);
    parked->pid = 0;
    /* 2. preempted while runnable (prev_state 0 = TASK_RUNNING): it waits on the queue again */
    if (args->prev_state == 0)
        runq_enqueued(prev);
    /* 3. the task switched in: its delay ends now; park it until it switches out */
    if (next == 0)
        return 0;
    u64 *ts = rswap_runq_start.lookup(&next);
    if (!ts)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 delay = now - *ts;
    rswap_runq_start.delete(&next);
    if (delay > RSWAP_MAX_DELTA_NS)
        return 0;
    parked->pid = next;
    parked->delay_ns = delay;
    return 0;
}
