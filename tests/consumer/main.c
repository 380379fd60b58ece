/* Links against an installed epx and runs a one-rank alltoall. */
#include <epx.h>
#include <stdio.h>

int main(void)
{
    epx_unique_id_t id;
    epx_comm_t comm;
    int x = 7, y = 0;
    if (epx_get_unique_id(&id) || epx_comm_init_rank(&comm, 1, 0, &id, NULL) ||
        epx_alltoall(comm, &x, &y, 1, EPX_I32, NULL) || y != 7)
        return 1;
    epx_comm_destroy(comm);
    printf("consumer ok (epx %d)\n", epx_get_version());
    return 0;
}
