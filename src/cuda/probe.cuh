/*
 * An opt-in timing probe of the low-latency kernels (cmake -DEPX_LL_PROBE=ON; a measuring
 * build, never a release one): the dispatch send and receive, and the combine on one host.
 * At each named point thread 0 of every block writes %globaltimer after a block barrier;
 * the host prints, for call EPX_PROBE_AT of the dispatch send launcher (the stamps of the
 * dispatch and the combine before it), every point's spread over the blocks in us from the
 * first send block's start (the combine's: from its first block's), to EPX_PROBE_FILE
 * (appended, one write per report, so ranks' reports do not interleave) or stderr. Only the
 * send's stream is synchronised: the combine's stamps are those of the last combine that
 * finished (one on the same stream, as in epx-bench, or none: its lines are then missing or
 * from an older call).
 * EPX_PROBE_AT must name a call made outside stream capture (it synchronises the stream).
 * Without EPX_LL_PROBE, EPX__PROBE is nothing: no barrier, no code.
 */
#ifndef EPX_CUDA_PROBE_CUH
#define EPX_CUDA_PROBE_CUH

/* Points: send (kernel 0), receive (kernel 1) and combine (kernel 2). */
enum {
    EPX__PS_START, /* send: entered */
    EPX__PS_FREE,  /* its sequence and the free-half check */
    EPX__PS_ROUTE, /* my routing written */
    EPX__PS_ROWS,  /* my rows written */
    EPX__PS_DONE,  /* the last block: fence, count, flags and completion */
    EPX__PR_START = 0, /* receive: entered */
    EPX__PR_FLAGS,     /* its sequence and the peers' flags */
    EPX__PR_SENT,      /* the send's grid done (griddepcontrol.wait) */
    EPX__PR_VERDICT,   /* headers, staged routing, verdict */
    EPX__PR_HANDLE,    /* the handle's routing arrays */
    EPX__PR_SCAN,      /* the first expert's first group's slot scan (no row copied yet) */
    EPX__PR_ROWS,      /* slot scans and row copies */
    EPX__PR_DONE,      /* the last block: completion */
    EPX__PC_START = 0, /* combine: entered, ptok staged */
    EPX__PC_ARRIVE,    /* my weights published (with the send step) and the peers' waited for */
    EPX__PC_PUSHED,    /* the peers' rows sent home */
    EPX__PC_PART,      /* counted, and the peers' LLC_PART waited for */
    EPX__PC_SUM,       /* my tokens summed */
    EPX__PC_DONE       /* the last block: completion */
};

#ifdef EPX_LL_PROBE
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define EPX__PROBE_BLOCKS 1024
#define EPX__PROBE_POINTS 8
__device__ unsigned long long epx__probe_t[3][EPX__PROBE_BLOCKS][EPX__PROBE_POINTS];

/* Every thread of the block calls it (a barrier). Blocks past EPX__PROBE_BLOCKS: nothing. */
static __device__ __forceinline__ void epx__probe(int k, int i)
{
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.x < EPX__PROBE_BLOCKS) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        epx__probe_t[k][blockIdx.x][i] = t;
    }
}
#define EPX__PROBE(k, i) epx__probe(k, i)

static int epx__probe_grid[3]; /* the last launches' grids */

/* Called by the send launcher before it launches: at call EPX_PROBE_AT, waits for the
 * stream and prints the dispatch (and the combine) before. */
static void epx__probe_dump(void *stream)
{
    static int calls;
    const char *at = getenv("EPX_PROBE_AT"), *path = getenv("EPX_PROBE_FILE");
    if (!at || ++calls != atoi(at)) return;
    static unsigned long long t[3][EPX__PROBE_BLOCKS][EPX__PROBE_POINTS];
    if (cudaStreamSynchronize((cudaStream_t)stream) != cudaSuccess ||
        cudaMemcpyFromSymbol(t, epx__probe_t, sizeof t) != cudaSuccess)
        return;
    static const char *names[3][EPX__PROBE_POINTS] = {
        {"start", "free half", "routing", "rows", "done"},
        {"start", "flags", "send done", "verdict", "handle", "scan", "rows", "done"},
        {"start", "arrive", "pushed", "part", "sum", "done"}};
    static const char *kname[3] = {"send   ", "receive", "combine"};
    int grid[3];
    unsigned long long t0[3] = {~0ull, ~0ull, ~0ull};
    for (int k = 0; k < 3; k++) {
        grid[k] = epx__probe_grid[k] < EPX__PROBE_BLOCKS ? epx__probe_grid[k] : EPX__PROBE_BLOCKS;
        for (int b = 0; b < grid[k]; b++)
            if (t[k][b][0] && t[k][b][0] < t0[k]) t0[k] = t[k][b][0];
    }
    t0[1] = t0[0]; /* the receive from the send's start */
    FILE *o = path ? fopen(path, "a") : stderr;
    if (!o) return;
    static char buf[16384]; /* the whole report, written at fclose */
    if (path) setvbuf(o, buf, _IOFBF, sizeof buf);
    fprintf(o, "probe: pid %d, call %d, send grid %d, receive grid %d, combine grid %d (us from the first send "
               "block's start; the combine from its first block's)\n",
            (int)getpid(), calls, grid[0], grid[1], grid[2]);
    static double v[EPX__PROBE_BLOCKS];
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < EPX__PROBE_POINTS; i++) {
            int n = 0, last = -1;
            for (int b = 0; b < grid[k]; b++) {
                if (!t[k][b][i] || t[k][b][i] < t0[k]) continue; /* not reached in this call */
                v[n++] = (double)(t[k][b][i] - t0[k]) / 1000.0;
                if (last < 0 || t[k][b][i] > t[k][last][i]) last = b;
            }
            if (n == 0) continue;
            for (int x = 1; x < n; x++) /* insertion sort: a few hundred blocks */
                for (int z = x; z > 0 && v[z - 1] > v[z]; z--) {
                    double s = v[z];
                    v[z] = v[z - 1], v[z - 1] = s;
                }
            fprintf(o, "  %s %-9s blocks %4d  min %7.2f  median %7.2f  p90 %7.2f  max %7.2f (block %d)\n",
                    kname[k], names[k][i], n, v[0], v[n / 2], v[n * 9 / 10], v[n - 1], last);
        }
    /* EPX_PROBE_RAW=k: every block of kernel k, its points in us (0 when not reached). */
    const char *raw = getenv("EPX_PROBE_RAW");
    for (int k = raw ? atoi(raw) : 3, b = 0; k >= 0 && k < 3 && b < grid[k]; b++) {
        fprintf(o, "  raw %d %4d", k, b);
        for (int i = 0; i < EPX__PROBE_POINTS; i++)
            fprintf(o, " %7.2f", t[k][b][i] >= t0[k] ? (double)(t[k][b][i] - t0[k]) / 1000.0 : 0.0);
        fputc('\n', o);
    }
    if (path) fclose(o);
}
#else
#define EPX__PROBE(k, i) ((void)0)
#endif

#endif /* EPX_CUDA_PROBE_CUH */
