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

/* Index of the overflow counters in the `rswap_stats` array. */
#define RSWAP_STAT_TASK_FULL 0
#define RSWAP_STAT_CGROUP_FULL 1
#define RSWAP_STAT_STALE 2
#define RSWAP_STAT_MAX 3

#endif
