#!/usr/bin/env python3
"""How long a relay holds each streamed frame: from the read that takes it off the upstream
socket to the write that hands it to the client's socket.

Why: the end-to-end event delay a client sees (`bench_load stream`) adds the VM's wake-up
of the relay and of the client to the relay's own work, and on this machine those wake-ups
vary by hundreds of microseconds between runs, with no proxy at all (see the `hop` control).
The time between a relay's two syscalls is its own: what it adds to each frame once the
kernel has delivered it.

Input: `perf script -F tid,time,event,trace --ns` of `raw_syscalls:sys_enter` and
`raw_syscalls:sys_exit`, recorded on the relay's processes while streams ran through it.
Client connections are those the relay accepted during the recording; any other socket it
reads is an upstream one. The upstream connection of a client is the one the relay writes
to next after reading that client's request (connections are reused, so this is learnt per
request). A frame is timed from the return of its upstream read to the start of the next
write to that client; reads the relay makes before that write are counted from the first.

Two figures per frame:
- `read_to_write_us`: the whole time, including other syscalls the relay makes meanwhile
  (a relay that reads every ready socket before writing any holds the first frame while it
  reads and writes the others);
- `user_us`: the same without the time spent inside those syscalls: the relay's own code.

    perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -p PID -o perf.data
    perf script -i perf.data -F tid,time,event,trace --ns > perf.txt
    bench/residence.py perf.txt
    bench/residence.py --self-test
"""

import collections
import json
import re
import sys

# x86_64 system call numbers.
READS = {0, 19, 45, 47}    # read, readv, recvfrom, recvmsg
WRITES = {1, 20, 44, 46}   # write, writev, sendto, sendmsg
ACCEPTS = {43, 288}        # accept, accept4
CLOSE = 3

LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+) (.*)")


def analyse(lines):
    """Summaries of `frame_times`."""
    whole, user = frame_times(lines)
    return {"read_to_write_us": summary(whole), "user_us": summary(user)}


def frame_times(lines):
    """Per-frame times (µs) from `perf script` lines, in trace order; see the module doc."""
    entered = {}                    # tid -> (nr, fd, time) of the syscall in progress
    in_syscalls = collections.Counter()  # tid -> seconds spent inside syscalls so far
    clients = set()
    upstream_of = {}                # client fd -> upstream fd
    request_from = {}               # tid -> client fd whose request was read last
    waiting = collections.defaultdict(list)  # upstream fd -> [(read return, in_syscalls then)]
    whole, user = [], []
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        tid, t, kind, nr, rest = int(m[1]), float(m[2]), m[3], int(m[4]), m[5]
        if kind == "enter":
            args = rest.strip("()").split(", ")
            try:
                fd = int(args[0], 16)
            except (ValueError, IndexError):
                fd = -1
            entered[tid] = (nr, fd, t)
            if nr == CLOSE:
                clients.discard(fd)
                upstream_of.pop(fd, None)
                waiting.pop(fd, None)
            elif nr in WRITES:
                if fd in clients:
                    up = upstream_of.get(fd)
                    if up is not None and waiting.get(up):
                        t0, s0 = waiting[up][0]
                        whole.append((t - t0) * 1e6)
                        user.append((t - t0 - (in_syscalls[tid] - s0)) * 1e6)
                        waiting[up].clear()
                else:
                    client = request_from.pop(tid, None)
                    if client is not None:
                        upstream_of[client] = fd
                    # A new request on this connection: earlier reads were answered.
                    waiting.pop(fd, None)
            continue
        try:
            ret = int(rest.split("=", 1)[1])
        except (ValueError, IndexError):
            continue
        _, fd, t_enter = entered.pop(tid, (nr, -1, t))
        in_syscalls[tid] += t - t_enter
        if nr in ACCEPTS and ret >= 0:
            clients.add(ret)
        elif nr in READS and ret > 0:
            if fd in clients:
                request_from[tid] = fd
            else:
                waiting[fd].append((t, in_syscalls[tid]))
    return whole, user


def summary(values):
    values = sorted(values)
    if not values:
        return {"frames": 0}

    def q(p):
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"frames": len(values), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "p999": q(0.999), "max": values[-1]}


def self_test():
    """A made-up trace with two streams whose frames interleave, a reused upstream
    connection, a closed and reused fd number, and a relay that batches its reads."""
    trace = """\
 7 1.000000000: raw_syscalls:sys_enter: NR 288 (5, 0, 0, 80800)
 7 1.000001000:  raw_syscalls:sys_exit: NR 288 = 10
 7 1.000002000: raw_syscalls:sys_enter: NR 0 (a, 0, 2000)
 7 1.000003000:  raw_syscalls:sys_exit: NR 0 = 120
 7 1.000004000: raw_syscalls:sys_enter: NR 20 (c, 0, 2)
 7 1.000005000:  raw_syscalls:sys_exit: NR 20 = 150
 7 1.000010000: raw_syscalls:sys_enter: NR 288 (5, 0, 0, 80800)
 7 1.000011000:  raw_syscalls:sys_exit: NR 288 = 11
 7 1.000012000: raw_syscalls:sys_enter: NR 45 (b, 0, 2000)
 7 1.000013000:  raw_syscalls:sys_exit: NR 45 = 120
 7 1.000014000: raw_syscalls:sys_enter: NR 44 (d, 0, 96)
 7 1.000015000:  raw_syscalls:sys_exit: NR 44 = 150
 7 1.000100000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7 1.000101000:  raw_syscalls:sys_exit: NR 0 = 300
 7 1.000102000: raw_syscalls:sys_enter: NR 0 (d, 0, 4000)
 7 1.000105000:  raw_syscalls:sys_exit: NR 0 = 300
 7 1.000106000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7 1.000107000:  raw_syscalls:sys_exit: NR 0 = -11
 7 1.000109000: raw_syscalls:sys_enter: NR 1 (a, 0, 300)
 7 1.000113000:  raw_syscalls:sys_exit: NR 1 = 300
 7 1.000114000: raw_syscalls:sys_enter: NR 1 (b, 0, 300)
 7 1.000115000:  raw_syscalls:sys_exit: NR 1 = 300
 7 1.000116000: raw_syscalls:sys_enter: NR 1 (a, 0, 5)
 7 1.000117000:  raw_syscalls:sys_exit: NR 1 = 5
 7 1.000200000: raw_syscalls:sys_enter: NR 3 (a)
 7 1.000201000:  raw_syscalls:sys_exit: NR 3 = 0
 7 1.000202000: raw_syscalls:sys_enter: NR 0 (b, 0, 4000)
 7 1.000203000:  raw_syscalls:sys_exit: NR 0 = 100
 7 1.000204000: raw_syscalls:sys_enter: NR 1 (a, 0, 100)
 7 1.000205000:  raw_syscalls:sys_exit: NR 1 = 100
 7 1.000206000: raw_syscalls:sys_enter: NR 0 (a, 0, 4000)
 7 1.000207000:  raw_syscalls:sys_exit: NR 0 = 300
 7 1.000210000: raw_syscalls:sys_enter: NR 0 (a, 0, 4000)
 7 1.000211000:  raw_syscalls:sys_exit: NR 0 = 300
 7 1.000213000: raw_syscalls:sys_enter: NR 20 (b, 0, 2)
 7 1.000214000:  raw_syscalls:sys_exit: NR 20 = 300
"""
    whole, user = frame_times(trace.splitlines())
    # c -> a: read returns at 101, write starts at 109, 4 µs of it inside the reads of d
    # and c. d -> b: 105 -> 114, 5 µs inside the read of c and the write to a. A second
    # write to a with no read since is no frame. Then a is closed and its number reused
    # for b's next request upstream: a -> b, two reads timed from the first (207 -> 213,
    # 1 µs inside the second read).
    assert [round(x, 3) for x in whole] == [8.0, 9.0, 6.0], whole
    assert [round(x, 3) for x in user] == [4.0, 4.0, 5.0], user
    got = analyse(trace.splitlines())
    assert got["read_to_write_us"]["frames"] == 3 and round(got["user_us"]["max"], 3) == 5.0
    print("residence self-test: ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    if len(sys.argv) != 2:
        sys.exit("usage: bench/residence.py PERF_SCRIPT_OUTPUT | --self-test")
    with open(sys.argv[1]) as f:
        print(json.dumps(analyse(f), indent=1))


if __name__ == "__main__":
    main()
