"""This machine's facilities, standard library only (the keeper shares them).

    procfs.py      /proc: start times, children, marked processes, mounts
    cgroups.py     cgroup v2: one cgroup per process entry
    notify.py      sd_notify (READY, STOPPING, WATCHDOG)
"""
