/*
 * Local launcher shared by epx-run and epx-bench: fork N ranks of a program with the
 * bootstrap environment (EPX_RANK, EPX_NRANKS, EPX_LOCAL_RANK, EPX_UNIQUE_ID), prefix each
 * line they print with "[rank] ", and stop them all when one fails or time runs out.
 */
#ifndef EPX_LAUNCH_H
#define EPX_LAUNCH_H

/* Run argv[0] (searched in PATH) with argv as N ranks. timeout_s <= 0: none.
 * Returns 0 when every rank exited 0; 124 on timeout; otherwise the first failing rank's
 * exit code (128 + signal for a signal), or 1. */
int epx_launch(int nranks, double timeout_s, char *const argv[]);

/* Run argv[0] (a path) with argv as a child in this process's group (a Ctrl-C reaches it
 * too), for at most timeout_s (<= 0: none): on timeout it gets SIGTERM, then SIGKILL 2 s
 * later (mpiexec passes them to its ranks). Returns its exit code (128 + signal for a
 * signal), 124 on timeout, 127 when it could not be started or waited for. */
int epx_run_timed(double timeout_s, char *const argv[]);

/* Remove the shared-memory names that ranks of the communicator with this unique id (text
 * form) left behind when they were killed: /dev/shm/epx-<nonce>-*. */
void epx_launch_cleanup_shm(const char *id_text);

#endif
