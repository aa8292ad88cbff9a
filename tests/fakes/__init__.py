"""Faithful fakes of interfaces this machine lacks (resctrl, NVML), each naming its source."""
