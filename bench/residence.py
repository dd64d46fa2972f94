#!/usr/bin/env python3
"""How long a relay holds each streamed frame: from the read that takes it off the upstream
socket to the write that hands it to the client's socket.

Why: the end-to-end event delay a client sees (`bench_load stream`) adds the VM's wake-up
of the relay and of the client to the relay's own work, and on this machine those wake-ups
vary by hundreds of microseconds between runs, with no proxy at all (see the `hop` control).
The time between a relay's two syscalls is its own: what it adds to each frame once the
kernel has delivered it.

Input: `perf script -F pid,tid,time,event,trace --ns` of `raw_syscalls:sys_enter` and
`raw_syscalls:sys_exit`, recorded on the relay's processes while streams ran through it,
and the socket fds each process had when the recording started (`/proc/PID/fd`); sockets
made meanwhile are seen in the trace (`socket`, `accept`). Client connections are those
the relay accepted during the recording; any other socket it reads is an upstream one. A
client's upstream connection is the one the relay writes to next after reading that
client's request, oldest request first (connections are reused, so this is learnt per
request). A frame is timed from the return of its upstream read to the start of the next
write to that client; reads the relay makes before that write are counted from the first.
The first such pair after each request is the response head, not a frame: left out.

Two figures per frame:
- `read_to_write_us`: the whole time, including other syscalls the relay makes meanwhile
  (a relay that reads every ready socket before writing any holds the first frame while it
  reads and writes the others);
- `user_us`: the same without the time spent inside those syscalls: the relay's own code
  (only for frames read and written by the same thread).

    perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -p PID -o perf.data
    perf script -i perf.data -F pid,tid,time,event,trace --ns > perf.txt
    bench/residence.py perf.txt PID:FD,FD,... [PID:FD,...]
    bench/residence.py --self-test
"""

import collections
import json
import os
import re
import sys

# x86_64 system call numbers.
READS = {0, 19, 45, 47}    # read, readv, recvfrom, recvmsg
WRITES = {1, 20, 44, 46}   # write, writev, sendto, sendmsg
ACCEPTS = {43, 288}        # accept, accept4
SOCKET = 41
CLOSE = 3

LINE = re.compile(r"\s*(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+) (.*)")


def socket_fds(pid):
    """The fds of `pid` that are sockets, now."""
    fds = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(os.path.join(base, name)).startswith("socket:"):
                fds.add(int(name))
        except (OSError, ValueError):
            pass
    return fds


def analyse(lines, sockets):
    """Summaries of `frame_times`."""
    whole, user, heads = frame_times(lines, sockets)
    return {"read_to_write_us": summary(whole), "user_us": summary(user),
            "heads_left_out": heads}


def frame_times(lines, sockets):
    """Per-frame times (µs) in trace order, and the number of response heads left out.
    `sockets`: pid -> the socket fds it had when the trace began. See the module doc."""
    sockets = {pid: set(fds) for pid, fds in sockets.items()}
    entered = {}                          # tid -> (nr, fd, time) of the syscall in progress
    in_syscalls = collections.Counter()   # tid -> seconds spent inside syscalls so far
    clients = collections.defaultdict(set)     # pid -> client fds
    upstream_of = {}                      # (pid, client fd) -> upstream fd
    requests = collections.defaultdict(collections.deque)  # tid -> client fds, oldest first
    waiting = collections.defaultdict(list)    # (pid, upstream fd) -> [(time, tid, in_syscalls)]
    head_due = set()                      # (pid, upstream fd) whose response head is next
    whole, user = [], []
    heads = 0
    for line in lines:
        m = LINE.match(line)
        if not m:
            continue
        pid, tid, t, kind, nr, rest = int(m[1]), int(m[2]), float(m[3]), m[4], int(m[5]), m[6]
        socks = sockets.setdefault(pid, set())
        if kind == "enter":
            args = rest.strip("()").split(", ")
            try:
                fd = int(args[0], 16)
            except (ValueError, IndexError):
                fd = -1
            entered[tid] = (nr, fd, t)
            if nr == CLOSE:
                socks.discard(fd)
                clients[pid].discard(fd)
                upstream_of.pop((pid, fd), None)
                waiting.pop((pid, fd), None)
                head_due.discard((pid, fd))
            elif nr in WRITES and fd in socks:
                if fd in clients[pid]:
                    up = (pid, upstream_of.get((pid, fd)))
                    if waiting.get(up):
                        t0, reader, s0 = waiting[up][0]
                        waiting[up].clear()
                        if up in head_due:
                            head_due.discard(up)
                            heads += 1
                        else:
                            whole.append((t - t0) * 1e6)
                            if reader == tid:
                                user.append((t - t0 - (in_syscalls[tid] - s0)) * 1e6)
                else:
                    # A request going upstream: its client is the oldest one waiting.
                    if requests[tid]:
                        upstream_of[(pid, requests[tid].popleft())] = fd
                    # Earlier reads on this connection were answered.
                    waiting.pop((pid, fd), None)
                    head_due.add((pid, fd))
            continue
        try:
            ret = int(rest.split("=", 1)[1])
        except (ValueError, IndexError):
            continue
        _, fd, t_enter = entered.pop(tid, (nr, -1, t))
        in_syscalls[tid] += t - t_enter
        if ret < 0:
            continue
        if nr in ACCEPTS:
            socks.add(ret)
            clients[pid].add(ret)
        elif nr == SOCKET:
            socks.add(ret)
        elif nr in READS and ret > 0 and fd in socks:
            if fd in clients[pid]:
                # A request read in several pieces (head, then body) is still one request.
                if fd not in requests[tid]:
                    requests[tid].append(fd)
            else:
                waiting[(pid, fd)].append((t, tid, in_syscalls[tid]))
    return whole, user, heads


def summary(values):
    values = sorted(values)
    if not values:
        return {"frames": 0}

    def q(p):
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"frames": len(values), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "p999": q(0.999), "max": values[-1]}


def self_test():
    """A made-up trace: two streams whose frames interleave, response heads, a second
    thread, a write to a non-socket fd, a closed fd number reused for an upstream
    connection, and a relay that batches its reads."""
    trace = """\
 7/7 1.000000000: raw_syscalls:sys_enter: NR 288 (5, 0, 0, 80800)
 7/7 1.000001000:  raw_syscalls:sys_exit: NR 288 = 10
 7/7 1.000002000: raw_syscalls:sys_enter: NR 288 (5, 0, 0, 80800)
 7/7 1.000003000:  raw_syscalls:sys_exit: NR 288 = 11
 7/7 1.000004000: raw_syscalls:sys_enter: NR 0 (a, 0, 2000)
 7/7 1.000005000:  raw_syscalls:sys_exit: NR 0 = 120
 7/7 1.000005500: raw_syscalls:sys_enter: NR 0 (a, 0, 2000)
 7/7 1.000005600:  raw_syscalls:sys_exit: NR 0 = 50
 7/7 1.000006000: raw_syscalls:sys_enter: NR 45 (b, 0, 2000)
 7/7 1.000007000:  raw_syscalls:sys_exit: NR 45 = 120
 7/7 1.000008000: raw_syscalls:sys_enter: NR 1 (4, 0, 8)
 7/7 1.000009000:  raw_syscalls:sys_exit: NR 1 = 8
 7/7 1.000010000: raw_syscalls:sys_enter: NR 20 (c, 0, 2)
 7/7 1.000011000:  raw_syscalls:sys_exit: NR 20 = 150
 7/7 1.000014000: raw_syscalls:sys_enter: NR 44 (d, 0, 96)
 7/7 1.000015000:  raw_syscalls:sys_exit: NR 44 = 150
 7/7 1.000050000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7/7 1.000051000:  raw_syscalls:sys_exit: NR 0 = 200
 7/7 1.000052000: raw_syscalls:sys_enter: NR 1 (a, 0, 200)
 7/7 1.000053000:  raw_syscalls:sys_exit: NR 1 = 200
 7/7 1.000060000: raw_syscalls:sys_enter: NR 0 (d, 0, 4000)
 7/7 1.000061000:  raw_syscalls:sys_exit: NR 0 = 200
 7/7 1.000062000: raw_syscalls:sys_enter: NR 1 (b, 0, 200)
 7/7 1.000063000:  raw_syscalls:sys_exit: NR 1 = 200
 7/7 1.000100000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7/7 1.000101000:  raw_syscalls:sys_exit: NR 0 = 300
 7/7 1.000102000: raw_syscalls:sys_enter: NR 0 (d, 0, 4000)
 7/7 1.000105000:  raw_syscalls:sys_exit: NR 0 = 300
 7/7 1.000106000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7/7 1.000107000:  raw_syscalls:sys_exit: NR 0 = -11
 7/7 1.000109000: raw_syscalls:sys_enter: NR 1 (a, 0, 300)
 7/7 1.000113000:  raw_syscalls:sys_exit: NR 1 = 300
 7/7 1.000114000: raw_syscalls:sys_enter: NR 1 (b, 0, 300)
 7/7 1.000115000:  raw_syscalls:sys_exit: NR 1 = 300
 7/7 1.000116000: raw_syscalls:sys_enter: NR 1 (a, 0, 5)
 7/7 1.000117000:  raw_syscalls:sys_exit: NR 1 = 5
 7/8 1.000150000: raw_syscalls:sys_enter: NR 0 (c, 0, 4000)
 7/8 1.000151000:  raw_syscalls:sys_exit: NR 0 = 300
 7/7 1.000160000: raw_syscalls:sys_enter: NR 1 (a, 0, 300)
 7/7 1.000161000:  raw_syscalls:sys_exit: NR 1 = 300
 7/7 1.000200000: raw_syscalls:sys_enter: NR 3 (a)
 7/7 1.000201000:  raw_syscalls:sys_exit: NR 3 = 0
 7/7 1.000202000: raw_syscalls:sys_enter: NR 0 (b, 0, 4000)
 7/7 1.000203000:  raw_syscalls:sys_exit: NR 0 = 100
 7/7 1.000203200: raw_syscalls:sys_enter: NR 1 (a, 0, 8)
 7/7 1.000203300:  raw_syscalls:sys_exit: NR 1 = 8
 7/7 1.000203500: raw_syscalls:sys_enter: NR 41 (2, 1, 0)
 7/7 1.000203600:  raw_syscalls:sys_exit: NR 41 = 14
 7/7 1.000204000: raw_syscalls:sys_enter: NR 1 (e, 0, 100)
 7/7 1.000205000:  raw_syscalls:sys_exit: NR 1 = 100
 7/7 1.000206000: raw_syscalls:sys_enter: NR 0 (e, 0, 4000)
 7/7 1.000207000:  raw_syscalls:sys_exit: NR 0 = 200
 7/7 1.000208000: raw_syscalls:sys_enter: NR 1 (b, 0, 200)
 7/7 1.000209000:  raw_syscalls:sys_exit: NR 1 = 200
 7/7 1.000216000: raw_syscalls:sys_enter: NR 0 (e, 0, 4000)
 7/7 1.000217000:  raw_syscalls:sys_exit: NR 0 = 300
 7/7 1.000220000: raw_syscalls:sys_enter: NR 0 (e, 0, 4000)
 7/7 1.000221000:  raw_syscalls:sys_exit: NR 0 = 300
 7/7 1.000223000: raw_syscalls:sys_enter: NR 20 (b, 0, 2)
 7/7 1.000224000:  raw_syscalls:sys_exit: NR 20 = 300
"""
    # fd 4 is not a socket (an eventfd, say); c and d are upstream connections pooled
    # before the trace began. Two requests (a's, in two reads, then b's) are read before
    # either goes upstream: a's goes to c, b's to d.
    whole, user, heads = frame_times(trace.splitlines(), {7: {12, 13}})
    # Heads c -> a (51 -> 52) and d -> b (61 -> 62) are left out, as is the head on the
    # new connection e -> b (207 -> 208). Frames: c -> a, 101 -> 109, 4 µs of it inside
    # the reads of d and c; d -> b, 105 -> 114, 5 µs inside the read of c and the write to
    # a; a second write to a with no read since is no frame; c -> a read by thread 8 at
    # 151 and written by 7 at 160: 9 µs whole, no own-code figure. Then a is closed, and
    # its number reused for a file: writing it maps no request. b's next request goes to
    # a new socket e: e -> b, two reads timed from the first (217 -> 223, 1 µs inside the
    # second read).
    assert heads == 3, heads
    assert [round(x, 3) for x in whole] == [8.0, 9.0, 9.0, 6.0], whole
    assert [round(x, 3) for x in user] == [4.0, 4.0, 5.0], user
    got = analyse(trace.splitlines(), {7: {12, 13}})
    assert got["read_to_write_us"]["frames"] == 4 and got["heads_left_out"] == 3, got
    print("residence self-test: ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    if len(sys.argv) < 2:
        sys.exit("usage: bench/residence.py PERF_SCRIPT_OUTPUT [PID:FD,FD,...] ... | --self-test")
    sockets = {}
    for arg in sys.argv[2:]:
        pid, _, fds = arg.partition(":")
        sockets[int(pid)] = {int(fd) for fd in fds.split(",") if fd}
    with open(sys.argv[1]) as f:
        print(json.dumps(analyse(f, sockets), indent=1))


if __name__ == "__main__":
    main()
