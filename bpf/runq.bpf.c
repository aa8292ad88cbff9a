/* Run-queue delay per cgroup2 id: the time from a task becoming runnable (woken, newly
 * created, or preempted while still runnable) to it running, as bcc's runqlat measures it,
 * as a log2 histogram in microseconds per cgroup.
 *
 * This is the program for when the run-queue collector is loaded alone.  Beside the CPU
 * collector, cpu.bpf.c (built with -DRSWAP_RUNQ) runs the same switch half inside its own
 * sched_switch program, so one program runs per switch; the wakeup half and the maps are in
 * rswap.h, shared by both.
 *
 * Only tracepoint arguments and helpers: no task_struct field is read.  The delay of a task is
 * read when it switches *out* (rswap.h says how), so the switch program needs only `current`,
 * this CPU's last switch time and whether the task is still runnable (prev_state and, on the
 * raw tracepoint, preempt).
 */
#include <uapi/linux/ptrace.h>
#define RSWAP_RUNQ
#include "rswap.h"

/* when this CPU last switched: the task running now was switched in then */
BPF_PERCPU_ARRAY(rswap_runq_switched, u64, 1);

static __always_inline void runq_on_switch(int runnable)
{
    int zero = 0;
    u64 *in = rswap_runq_switched.lookup(&zero);
    if (!in)
        return;
    u64 now = bpf_ktime_get_ns();
    u64 in_ts = *in;
    *in = now;
    u64 delay = runq_switch_out((u32)bpf_get_current_pid_tgid(), runnable, in_ts, now);
    if (delay)
        runq_add(bpf_get_current_cgroup_id(), runq_bucket(delay), 1, delay);
}

/* The wakeup half (rswap.h).  Not bcc's auto-attached TRACEPOINT_PROBE: the collector attaches
 * these.  bcc generates the argument structs in the main file only, so each
 * program that runs the half defines them. */
int rswap_runq_wakeup(struct tracepoint__sched__sched_wakeup *args)
{
    runq_enqueued(args->pid);
    return 0;
}

int rswap_runq_wakeup_new(struct tracepoint__sched__sched_wakeup_new *args)
{
    runq_enqueued(args->pid);
    return 0;
}

#ifdef RSWAP_RAW_TP
/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 *          unsigned int prev_state): the fourth argument exists from Linux 5.18 */
RAW_TRACEPOINT_PROBE(sched_switch)
{
    runq_on_switch((u8)ctx->args[0] || (u32)ctx->args[3] == 0);
    return 0;
}
#else
TRACEPOINT_PROBE(sched, sched_switch)
{
    runq_on_switch(args->prev_state == 0 || args->prev_state == RSWAP_TASK_REPORT_MAX);
    return 0;
}
#endif
