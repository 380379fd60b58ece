/* Local launcher (see launch.h). */
#include "launch.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "epx.h"

typedef struct {
    pid_t pid;
    int fd[2];      /* stdout, stderr pipes (read ends), -1 once closed */
    char *line[2];  /* pending partial line */
    size_t len[2], cap[2];
    int exited, status;
} epx__rank_proc_t;

static double epx__now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void epx__write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        p += w;
        n -= (size_t)w;
    }
}

/* Emit every complete line of the buffer, prefixed; keep the rest. With `flush`, emit it
 * all (a last line without newline gets one). */
static void epx__emit(epx__rank_proc_t *r, int rank, int s, int flush)
{
    char prefix[32];
    int plen = snprintf(prefix, sizeof prefix, "[%d] ", rank);
    size_t start = 0;
    for (size_t i = 0; i < r->len[s]; i++) {
        if (r->line[s][i] != '\n') continue;
        epx__write_all(s ? 2 : 1, prefix, (size_t)plen);
        epx__write_all(s ? 2 : 1, r->line[s] + start, i + 1 - start);
        start = i + 1;
    }
    if (flush && start < r->len[s]) {
        epx__write_all(s ? 2 : 1, prefix, (size_t)plen);
        epx__write_all(s ? 2 : 1, r->line[s] + start, r->len[s] - start);
        epx__write_all(s ? 2 : 1, "\n", 1);
        start = r->len[s];
    }
    memmove(r->line[s], r->line[s] + start, r->len[s] - start);
    r->len[s] -= start;
}

/* The signal that asked the launcher to stop (SIGINT, SIGTERM, SIGHUP), or 0. The ranks run
 * in process groups of their own, so a Ctrl-C at the terminal or a scheduler's SIGTERM
 * reaches only the launcher: it passes them on (epx_launch's loop). */
static volatile sig_atomic_t epx__stop_signal;

static void epx__on_stop_signal(int sig) { epx__stop_signal = sig; }

static void epx__kill_all(epx__rank_proc_t *ranks, int n, int sig)
{
    for (int i = 0; i < n; i++)
        if (ranks[i].pid > 0 && !ranks[i].exited) kill(-ranks[i].pid, sig), kill(ranks[i].pid, sig);
}

void epx_launch_cleanup_shm(const char *id_text)
{
    const char *nonce = strrchr(id_text, ':');
    if (!nonce) return;
    char prefix[64];
    snprintf(prefix, sizeof prefix, "epx-%s-", nonce + 1);
    DIR *d = opendir("/dev/shm");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            char path[512];
            snprintf(path, sizeof path, "/dev/shm/%s", e->d_name);
            unlink(path);
        }
    }
    closedir(d);
}

/* The environment of rank r (made before the fork: the child only execs): this process's,
 * without any EPX_RANK, EPX_LOCAL_RANK, EPX_NRANKS or EPX_UNIQUE_ID, then those of rank r.
 * vars: [4] buffers of 160 bytes for them. Returns a static array (one rank at a time). */
static char **epx__rank_env(int r, int nranks, const char *id_text, char (*vars)[160])
{
    extern char **environ;
    static char **envp;
    static size_t cap;
    size_t n = 0;
    while (environ[n]) n++;
    if (cap < n + 5) {
        char **e = realloc(envp, sizeof *e * (n + 5));
        if (!e) return NULL;
        envp = e, cap = n + 5;
    }
    static const char *const ours[] = {"EPX_RANK=", "EPX_LOCAL_RANK=", "EPX_NRANKS=", "EPX_UNIQUE_ID="};
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        bool mine = false;
        for (size_t j = 0; j < 4; j++) mine = mine || strncmp(environ[i], ours[j], strlen(ours[j])) == 0;
        if (!mine) envp[k++] = environ[i];
    }
    snprintf(vars[0], sizeof vars[0], "EPX_RANK=%d", r);
    snprintf(vars[1], sizeof vars[1], "EPX_LOCAL_RANK=%d", r);
    snprintf(vars[2], sizeof vars[2], "EPX_NRANKS=%d", nranks);
    snprintf(vars[3], sizeof vars[3], "EPX_UNIQUE_ID=%s", id_text);
    for (size_t j = 0; j < 4; j++) envp[k++] = vars[j];
    envp[k] = NULL;
    return envp;
}

int epx_launch(int nranks, double timeout_s, char *const argv[])
{
    char vars[4][160], no_exec[512]; /* what a child says when its exec fails (made before the fork) */
    snprintf(no_exec, sizeof no_exec, "epx-run: cannot run %s (not found or not executable)\n", argv[0]);
    epx_unique_id_t id;
    char id_text[EPX_UNIQUE_ID_STRLEN];
    if (epx_get_unique_id(&id) != EPX_SUCCESS || epx_unique_id_to_string(&id, id_text, sizeof id_text) != EPX_SUCCESS) {
        fprintf(stderr, "epx-run: cannot create a unique id: %s\n", epx_get_last_error());
        return 1;
    }
    epx__rank_proc_t *ranks = calloc((size_t)nranks, sizeof *ranks);
    if (!ranks) return 1;
    fflush(stdout);
    fflush(stderr);
    int started = 0, result = 0;
    static const int stop_sigs[3] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction stop_sa, old_sa[3];
    memset(&stop_sa, 0, sizeof stop_sa);
    stop_sa.sa_handler = epx__on_stop_signal;
    sigemptyset(&stop_sa.sa_mask);
    epx__stop_signal = 0;
    for (int i = 0; i < 3; i++) sigaction(stop_sigs[i], &stop_sa, &old_sa[i]);
    for (int r = 0; r < nranks && !epx__stop_signal; r++) {
        /* Close-on-exec: rank r must not hold the read ends of ranks 0..r-1 (fds it does not
         * know of, and pipes that then stay open when the launcher is gone). */
        int out[2], err[2];
        if (pipe2(out, O_CLOEXEC) != 0) {
            perror("epx-run: pipe");
            result = 1;
            break;
        }
        if (pipe2(err, O_CLOEXEC) != 0) {
            perror("epx-run: pipe");
            close(out[0]), close(out[1]);
            result = 1;
            break;
        }
        char **envp = epx__rank_env(r, nranks, id_text, vars);
        if (!envp) {
            fprintf(stderr, "epx-run: out of memory\n");
            result = 1;
            break;
        }
        pid_t pid = fork();
        if (pid < 0) {
            perror("epx-run: fork");
            result = 1;
            break;
        }
        if (pid == 0) { /* async-signal-safe calls only: the id's listener thread may hold a lock */
            for (int i = 0; i < 3; i++) sigaction(stop_sigs[i], &old_sa[i], NULL);
            setpgid(0, 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
            close(out[0]), close(out[1]), close(err[0]), close(err[1]);
            execvpe(argv[0], argv, envp);
            if (write(2, no_exec, strlen(no_exec)) < 0) _exit(127);
            _exit(127);
        }
        setpgid(pid, pid);
        close(out[1]);
        close(err[1]);
        ranks[r].pid = pid;
        ranks[r].fd[0] = out[0];
        ranks[r].fd[1] = err[0];
        started++;
    }

    double deadline = timeout_s > 0 ? epx__now_s() + timeout_s : 0;
    int alive = started, open_fds = 2 * started, killed = result != 0;
    double kill_time = killed ? epx__now_s() : 0;
    if (killed) epx__kill_all(ranks, started, SIGTERM);
    struct pollfd *pfd = calloc((size_t)(2 * nranks), sizeof *pfd);
    while (alive > 0 || open_fds > 0) {
        int n = 0;
        for (int r = 0; r < started; r++)
            for (int s = 0; s < 2; s++)
                if (ranks[r].fd[s] >= 0) pfd[n++] = (struct pollfd){ranks[r].fd[s], POLLIN, 0};
        poll(pfd, (nfds_t)n, 50);
        for (int r = 0; r < started; r++) {
            for (int s = 0; s < 2; s++) {
                epx__rank_proc_t *rp = &ranks[r];
                if (rp->fd[s] < 0) continue;
                for (;;) {
                    struct pollfd one = {rp->fd[s], POLLIN, 0};
                    if (poll(&one, 1, 0) <= 0) break;
                    if (rp->cap[s] - rp->len[s] < 4096) {
                        rp->cap[s] = rp->cap[s] ? 2 * rp->cap[s] : 8192;
                        rp->line[s] = realloc(rp->line[s], rp->cap[s]);
                    }
                    ssize_t k = read(rp->fd[s], rp->line[s] + rp->len[s], rp->cap[s] - rp->len[s]);
                    if (k < 0 && errno == EINTR) continue;
                    if (k <= 0) {
                        epx__emit(rp, r, s, 1);
                        close(rp->fd[s]);
                        rp->fd[s] = -1;
                        open_fds--;
                        break;
                    }
                    rp->len[s] += (size_t)k;
                    epx__emit(rp, r, s, 0);
                }
            }
        }
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int r = 0; r < started; r++) {
                if (ranks[r].pid != pid) continue;
                ranks[r].exited = 1;
                ranks[r].status = status;
                alive--;
                int failed = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
                if (failed && !killed) {
                    if (WIFSIGNALED(status))
                        fprintf(stderr, "epx-run: rank %d killed by signal %d; stopping the others\n", r, WTERMSIG(status));
                    else
                        fprintf(stderr, "epx-run: rank %d exited with %d; stopping the others\n", r, WEXITSTATUS(status));
                    result = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
                    killed = 1;
                    kill_time = epx__now_s();
                    epx__kill_all(ranks, started, SIGTERM);
                }
            }
        }
        if (!killed && epx__stop_signal) {
            fprintf(stderr, "epx-run: got signal %d; stopping all ranks\n", (int)epx__stop_signal);
            result = 128 + epx__stop_signal;
            killed = 1;
            kill_time = epx__now_s();
            epx__kill_all(ranks, started, SIGTERM);
        }
        if (!killed && deadline > 0 && epx__now_s() > deadline) {
            fprintf(stderr, "epx-run: timeout after %.0f s; killing all ranks\n", timeout_s);
            result = 124;
            killed = 1;
            kill_time = epx__now_s();
            epx__kill_all(ranks, started, SIGTERM);
        }
        if (killed && alive > 0 && epx__now_s() - kill_time > 2.0) epx__kill_all(ranks, started, SIGKILL);
        /* Stop reading pipes that stay open after every rank is gone (grandchildren). */
        if (alive == 0 && open_fds > 0 && killed && epx__now_s() - kill_time > 5.0) break;
    }
    free(pfd);
    if (epx__stop_signal && result == 0) result = 128 + epx__stop_signal; /* before any rank started */
    for (int r = 0; r < started; r++) {
        free(ranks[r].line[0]);
        free(ranks[r].line[1]);
    }
    free(ranks);
    epx_launch_cleanup_shm(id_text);
    for (int i = 0; i < 3; i++) sigaction(stop_sigs[i], &old_sa[i], NULL);
    return result;
}

int epx_run_timed(double timeout_s, char *const argv[])
{
    char no_exec[512]; /* made before the fork */
    snprintf(no_exec, sizeof no_exec, "epx-run: cannot run %s: not found or not executable\n", argv[0]);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("epx-run: fork");
        return 127;
    }
    if (pid == 0) {
        execv(argv[0], argv);
        if (write(2, no_exec, strlen(no_exec)) < 0) _exit(127);
        _exit(127);
    }
    double deadline = timeout_s > 0 ? epx__now_s() + timeout_s : 0, kill_time = 0;
    for (;;) {
        int status;
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) {
            if (kill_time > 0) return 124;
            return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
        }
        if (w < 0 && errno != EINTR) return 127;
        double now = epx__now_s();
        if (kill_time == 0 && deadline > 0 && now > deadline) {
            fprintf(stderr, "epx-run: timeout after %.0f s; killing %s\n", timeout_s, argv[0]);
            kill(pid, SIGTERM);
            kill_time = now;
        }
        if (kill_time > 0 && now - kill_time > 2.0) kill(pid, SIGKILL);
        usleep(20000);
    }
}
