"""A PMU collector whose sched_switch handler is not attached but run on demand (tests only).

bpf/pmu.bpf.c built with RSWAP_PMU_TEST_RUN exports the handler as ``rswap_pmu_switch``;
:meth:`PmuTestRun.run_switch` executes it once through ``BPF_PROG_TEST_RUN`` (bpf(2)) on the
calling thread, which is then ``current``: one sched_switch of this process, with the counter
values the test put in the replay array (``set_counters``).  Everything else is the product's
:class:`PmuCollector` in replay mode.
"""
from __future__ import annotations

import ctypes
import os

from rswap_ebpf.errors import FeatureMissing
from rswap_ebpf.host import bpf
from rswap_ebpf.host.cache.pmu import PmuCollector

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_TEST_RUN = 10


class PmuTestRun(PmuCollector):
    def __init__(self, sample: int = 1, pin: bool = True) -> None:
        super().__init__(sample=sample, replay=True, pin=pin)
        self._fn = None

    def _attach_flags(self) -> list[str]:
        return ["-DRSWAP_PMU_TEST_RUN"]

    def _attached(self, flags: list[str]) -> str:
        bcc = bpf.import_bcc()
        self._fn = self._bpf.load_func(b"rswap_pmu_switch", bcc.BPF.RAW_TRACEPOINT)
        return "BPF_PROG_TEST_RUN"

    def run_switch(self) -> None:
        """Execute the sched_switch handler once, as the calling thread.

        ``BPF_PROG_TEST_RUN`` without ``BPF_F_TEST_RUN_ON_CPU`` runs it on the current CPU with
        ``current`` = the caller, so pin the caller to one CPU to stay on one per-CPU state.
        """
        if self._fn is None:
            raise RuntimeError("run_switch needs an open PmuTestRun")
        attr = (ctypes.c_uint8 * 80)()
        ctypes.c_uint32.from_buffer(attr, 0).value = self._fn.fd
        libc = ctypes.CDLL(None, use_errno=True)
        nr = _NR_BPF.get(os.uname().machine)
        if nr is None:
            raise FeatureMissing("BPF_PROG_TEST_RUN", f"no bpf(2) number known for {os.uname().machine}")
        rc = libc.syscall(nr, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
        if rc != 0:
            err = ctypes.get_errno()
            raise FeatureMissing("BPF_PROG_TEST_RUN", f"raw tracepoint test run failed: "
                                 f"{os.strerror(err)}", "needs Linux 5.10 or later")

    def close(self) -> None:
        super().close()
        self._fn = None
