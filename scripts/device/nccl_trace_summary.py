"""Summarizes the TRAINER_NCCL_TRACE=1 lines of one data-parallel run:
    python3 scripts/device/nccl_trace_summary.py run.log
Steps are told apart by pauses of >10 ms between bucket launches; the first
five are skipped. Per step and rank, "after" is the end of the step's last
all-reduce minus the time that rank's compute reached its last bucket (its
backward end): the rank with the smallest "after" finished its backward last
(the laggard), its "after" is the exposed tail, the spread over ranks the
skew. Then rank 0's buckets (NCCL time, waiting for peers included, and time
queued behind earlier ones) and, per rank, how far the host ran ahead of the
GPU at each launch."""
import re, sys, statistics as st, collections
log = sys.argv[1]
pat = re.compile(r"rank (\d+): NCCL all_reduce \(avg\) of (\d+) \w+ elements.* host ([\d.]+) ready ([\d.]+) start ([\d.]+) end ([\d.]+) nccl ([\d.]+)")
ops = collections.defaultdict(list)
for l in open(log):
    m = pat.search(l)
    if m:
        r, n, h, a, b, c, d = m.groups()
        ops[int(r)].append((int(n), float(a), float(b), float(c), float(d), float(h)))
if not ops:
    print("  no trace"); sys.exit()
def steps(o):  # split where compute paused > 10 ms between bucket launches
    out, cur = [], [o[0]]
    for x in o[1:]:
        if x[1] - cur[-1][1] > 10.0:
            out.append(cur); cur = []
        cur.append(x)
    out.append(cur)
    return out
per = {r: steps(o) for r, o in sorted(ops.items())}
n = min(len(s) for s in per.values())
med = lambda xs: st.median(xs) if xs else float('nan')
after = collections.defaultdict(list); skew = []; tail = []; slowest = collections.Counter()
bucket_nccl = collections.defaultdict(list); bucket_queue = collections.defaultdict(list)
lead = collections.defaultdict(lambda: collections.defaultdict(list))
for k in range(5, n):
    a = {}
    for r, s in per.items():
        step = s[k]
        a[r] = max(x[3] for x in step) - max(x[1] for x in step)
        after[r].append(a[r])
        for i, x in enumerate(step):
            lead[r][i].append(x[1] - x[5])
        if r == min(per):
            for i, x in enumerate(step):
                bucket_nccl[i].append(x[4]); bucket_queue[i].append(x[2] - x[1])
    lag = min(a, key=a.get); slowest[lag] += 1
    skew.append(max(a.values()) - min(a.values())); tail.append(a[lag])
if not skew:
    print(f"  only {n} steps: nothing after the first five to summarize"); sys.exit()
print(f"  steps={n} buckets/step={len(per[min(per)][n-1])} laggard tail med={med(tail):.2f} ms  skew med={med(skew):.2f} max={max(skew):.2f}  laggard counts {dict(sorted(slowest.items()))}")
print("  per rank after-backward med: " + "  ".join(f"r{r}:{med(v):.2f}" for r, v in sorted(after.items())))
print("  rank0 buckets in launch order, elems:nccl/queue ms: " + "  ".join(
    f"{per[min(per)][n-1][i][0]/1e6:.1f}M:{med(bucket_nccl[i]):.2f}/{med(bucket_queue[i]):.2f}" for i in sorted(bucket_nccl)))
print("  GPU ready minus host launch (ms; ~0: the GPU waits for the host), per rank, buckets in launch order:")
for r in sorted(lead):
    print(f"   r{r}: " + " ".join(f"{med(v):.2f}" for i, v in sorted(lead[r].items())))
