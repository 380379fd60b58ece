/*
 * Communicators made and ended in quick succession, each after one MoE call in which no
 * rank has a token. epx_comm_destroy is local, so a rank that had nothing to send may end
 * its communicator (and remove the names of its shared memory, or free its device memory)
 * while a slower peer is still in the call, about to read that rank's part of it: the peer
 * must still complete. Each round's communicator comes from the first one
 * (test_comm_again). Both backends (--cuda: buffers in device memory).
 */
#include <string.h>

#include "testlib.h"

int main(int argc, char **argv)
{
    test_init(argc, argv);
    int me, R, passed = 0;
    epx_comm_t comm = test_comm_from_env(&me, &R);
    const int H = 8;
    void *x = test_buf_alloc(sizeof(uint16_t) * 8), *rx = test_buf_alloc(sizeof(uint16_t) * 4 * 8);
    void *idx = test_buf_alloc(sizeof(int32_t));
    test_buf_poison(x, 0, sizeof(uint16_t) * 8);
    test_buf_poison(idx, 0, sizeof(int32_t));
    for (int round = 0; round < 30; round++) {
        epx_comm_t c;
        ASSERT_OK(test_comm_again(comm, NULL, &c));
        epx_moe_config_t cfg = EPX_MOE_CONFIG_INITIALIZER;
        cfg.hidden = H, cfg.max_tokens_per_rank = 1, cfg.num_experts = R, cfg.max_topk = 1;
        cfg.index_dtype = EPX_I32;
        epx_moe_t moe;
        ASSERT_OK(epx_moe_create(c, &cfg, &moe));
        epx_moe_dispatch_in_t in = {x, NULL, idx, NULL, 0, 1};
        epx_moe_dispatch_out_t out;
        memset(&out, 0, sizeof out);
        out.recv_x = rx, out.capacity = 4;
        epx_moe_handle_t h = NULL;
        epx_status_t st = epx_moe_dispatch(moe, &in, &out, &h, test_stream());
        if (st != EPX_SUCCESS)
            TEST_FAIL_("round %d: a dispatch of no token returned %s (%s)", round, epx_status_name(st),
                       epx_comm_get_last_error(c));
        ASSERT_EQ(out.num_recv_tokens, 0);
        test_sync();
        ASSERT_OK(epx_moe_handle_destroy(h));
        ASSERT_OK(epx_moe_destroy(moe));
        ASSERT_OK(epx_comm_destroy(c)); /* no barrier: a peer may still be in the dispatch */
        passed++;
    }
    test_buf_free(x), test_buf_free(rx), test_buf_free(idx);
    test_finish(comm, passed);
    return 0;
}
