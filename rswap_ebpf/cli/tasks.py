"""``rswap exec`` and ``rswap task add|list|remove``: the scheduler side, over the control socket.

``rswap exec`` asks the running daemon for NAME's predicted needs, has them allocated in a cgroup
the daemon made (and journalled), places its child there before exec, waits, passes the exit status
through and releases the units.  Exit status: the command's (128+N when killed by signal N);
75 (EX_TEMPFAIL) when the pool cannot cover the prediction (or --timeout passed); 2 for bad input;
127 when COMMAND cannot be run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from rswap_ebpf.cli import args as args_

EX_TEMPFAIL = 75

EPILOG_EXEC = """examples (as root):
  rswap exec --name web --priority critical -- nginx -g 'daemon off;'
  rswap exec --name etl --priority batch --wait --timeout 600 -- ./etl.sh
  rswap exec --name build --min cpu=500 --max cpu=1500 -- make -j2
  rswap exec --name infer --min coproc:npu=1 --max coproc:npu=2 -- ./serve-model
exit status: COMMAND's (128+N if killed by signal N); 75 when the pool cannot cover the
prediction (refused, or --timeout passed); 2 for bad input; 127 when COMMAND cannot be run.
"""

EPILOG_TASK = """examples (as root):
  rswap task add --name db --priority critical --cgroup system.slice/postgresql.service
  rswap task add --name job --priority batch --pid 4242 --pid 4243 --min cpu=100
  rswap task add --name spin --priority batch -- stress-ng --cpu 2
  rswap task list
  rswap task remove db
"""


def _common(p) -> None:
    p.add_argument("--name", required=True, help="the task's stable name (its profile's key)")
    p.add_argument("--priority", default="normal", choices=["critical", "normal", "batch"])
    p.add_argument("--min", action="append", type=args_.limit, default=[], metavar="RES=UNITS",
                   help="guaranteed minimum (repeatable; a bare number is cpu millicores; a named "
                        "co-processor is coproc:NAME=UNITS)")
    p.add_argument("--max", action="append", type=args_.limit, default=[], metavar="RES=UNITS",
                   help="maximum (repeatable)")
    p.add_argument("--forecaster", type=args_.forecaster, metavar="NAME|JSON",
                   help="forecaster for this task (last_value, seasonal_naive, holt_winters, "
                        "auto, or a JSON table such as '{\"name\": \"seasonal_naive\", \"period\": 8}')")


def register(sub) -> dict:
    ex = sub.add_parser("exec", help="run COMMAND with its predicted resources allocated first",
                        epilog=EPILOG_EXEC, formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Ask the running daemon for NAME's predicted needs, have them "
                        "allocated, run COMMAND in its own cgroup with them in place, and release "
                        "them when it exits.")
    _common(ex)
    ex.add_argument("--wait", action="store_true",
                    help="when the pool is short, wait in the priority queue instead of failing")
    ex.add_argument("--timeout", type=args_.seconds(), metavar="SECONDS",
                    help="with --wait: give up after this long (exit 75)")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")

    task = sub.add_parser("task", help="add, list or remove tasks of the running daemon",
                          epilog=EPILOG_TASK, formatter_class=argparse.RawDescriptionHelpFormatter)
    tsub = task.add_subparsers(dest="task_command", metavar="add|list|remove", required=True)
    add = tsub.add_parser("add", help="manage a cgroup, some pids or a new command from now on")
    _common(add)
    where = add.add_mutually_exclusive_group()
    where.add_argument("--cgroup", metavar="PATH", help="an existing cgroup (relative to the mount)")
    where.add_argument("--pid", type=int, action="append", metavar="PID",
                       help="move this process into the task's cgroup (repeatable)")
    add.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    ls = tsub.add_parser("list", help="the daemon's tasks, their allocations and the wait queue")
    ls.add_argument("--json", action="store_true")
    rm = tsub.add_parser("remove", help="stop managing a task (a command rswap started is stopped)")
    rm.add_argument("name")
    return {"exec": cmd_exec, "task": cmd_task}


def _limits(args) -> dict:
    out: dict[str, dict] = {}
    for key, value in args.min:
        out.setdefault(key, {})["min"] = value
    for key, value in args.max:
        out.setdefault(key, {})["max"] = value
    return out


def _argv(rest: list[str]) -> list[str]:
    return rest[1:] if rest and rest[0] == "--" else rest


def _print_error(reply: dict) -> None:
    print(f"rswap: error: {reply.get('error')}", file=sys.stderr)


def cmd_exec(args) -> int:
    from rswap_ebpf.server.control import answer_timeout, raw_request

    argv = _argv(args.argv)
    if not argv:
        from rswap_ebpf.errors import ConfigError

        raise ConfigError("COMMAND", "give the command to run after --")
    args_.need_root("exec")
    req = {"op": "exec.allocate", "name": args.name, "priority": args.priority,
           "limits": _limits(args), "wait": args.wait, "timeout": args.timeout}
    if args.forecaster is not None:
        req["forecaster"] = args.forecaster
    wait_s = (None if args.wait and args.timeout is None
              else (args.timeout or 0) + answer_timeout(30))
    reply = raw_request(req, timeout=wait_s)
    if not reply.get("ok"):
        _print_error(reply)
        return 2 if "field" in reply else EX_TEMPFAIL
    alloc = ", ".join(f"{k} {v}" for k, v in reply["allocation"].items())
    pred = ", ".join(f"{k} {'unknown' if v is None else v}" for k, v in reply["predicted"].items())
    extra = f" after {reply['waited_s']}s in the queue" if reply.get("waited_s") else ""
    if reply.get("gpu_device") is not None:
        extra += f", on GPU {reply['gpu_device']}"
    print(f"rswap: {args.name} ({args.priority}) allocated {alloc} (forecast {pred}){extra}",
          file=sys.stderr)
    return _run_in(reply["procs"], argv, args.name, reply.get("env") or {})


def _run_in(procs: list[str], argv: list[str], name: str, env: dict | None = None) -> int:
    """Fork; the child joins the task's cgroup before exec; the parent waits and releases."""
    from rswap_ebpf.server.control import answer_timeout, request
    from rswap_ebpf.errors import RswapError

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            me = str(os.getpid())
            for p in procs:
                with open(p, "w") as f:
                    f.write(me)
            os.environ.update({str(k): str(v) for k, v in (env or {}).items()})  # the GPU placed
            os.execvp(argv[0], argv)
        except OSError as err:
            os.write(2, f"rswap: cannot run {argv[0]!r}: {err.strerror}\n".encode())
            os._exit(126 if isinstance(err, PermissionError) else 127)
        os._exit(127)

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # The terminal signals the whole process group (INT, QUIT); the others are forwarded.
    for s in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = 0
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    try:
        request("exec.release", timeout=answer_timeout(), name=name)
    except RswapError as err:  # the daemon may have reaped it first, or stopped
        if "no task named" not in str(err):
            print(f"rswap: releasing {name}: {err}", file=sys.stderr)
    return code


def cmd_task(args) -> int:
    from rswap_ebpf.server.control import answer_timeout, raw_request

    args_.need_root("task")
    if args.task_command == "list":
        reply = raw_request({"op": "task.list"}, timeout=answer_timeout())
        if not reply.get("ok"):
            _print_error(reply)
            return 1
        if args.json:
            json.dump({"tasks": reply["tasks"], "queued": reply["queued"]}, sys.stdout, indent=2)
            print()
            return 0
        from rswap_ebpf.cli.format import Column, render_table

        rows = [[t["name"], t["priority"], t["source"], t["pids"],
                 ", ".join(f"{k} {v}" for k, v in t["allocation"].items())] for t in reply["tasks"]]
        rows += [[name, "", "queued", "", "(waiting for units)"] for name in reply["queued"]]
        print(render_table((Column("TASK"), Column("PRIO"), Column("SOURCE"), Column("PIDS", ">"),
                            Column("ALLOCATION")), rows))
        return 0
    if args.task_command == "remove":
        reply = raw_request({"op": "task.remove", "name": args.name}, timeout=answer_timeout())
        if not reply.get("ok"):
            _print_error(reply)
            return 2 if "field" in reply else 1
        freed = ", ".join(f"{k} {v}" for k, v in reply["released"].items()) or "nothing"
        print(f"rswap: task {args.name} removed; released {freed}")
        return 0
    req = {"op": "task.add", "name": args.name, "priority": args.priority, **_limits(args)}
    argv = _argv(args.argv)
    if argv:
        req["command"] = argv
    if args.cgroup:
        req["cgroup"] = args.cgroup
    if args.pid:
        req["pids"] = args.pid
    if args.forecaster is not None:
        req["forecaster"] = args.forecaster
    reply = raw_request(req, timeout=answer_timeout())
    if not reply.get("ok"):
        _print_error(reply)
        return 2 if "field" in reply else 1
    print(f"rswap: task {args.name} added in {reply['cgroup']}")
    return 0
