#define _POSIX_C_SOURCE 200809L
/* A host whose sp_init is given a NULL execute callback: the host gets SP_NULL_ARGUMENT, and
 * a worker launched from it never returns from sp_init into the host's main (its spawn step
 * fails, saying why). */
#include "stateful_pool.h"
#include <stdio.h>
#include <stdlib.h>

static int32_t spawn_cb(void *user, const sp_worker_info *info, const uint8_t *args,
                        size_t args_len, void **state, sp_reply *reply) {
    (void)user; (void)info; (void)args; (void)args_len; (void)reply;
    *state = NULL;
    return SP_WORKER_OK;
}

int main(void) {
    sp_worker_callbacks cb = {NULL, spawn_cb, NULL, NULL, NULL};
    sp_status s = sp_init(&cb);
    if (getenv("SP_TEST_HOST_STARTED")) {
        printf("host main ran in a worker\n");
        return 3;
    }
    setenv("SP_TEST_HOST_STARTED", "1", 1);
    printf("sp_init: %s\n", sp_status_name(s));
    sp_pool_options o;
    sp_pool_options_init(&o);
    o.spawn_timeout_ms = 60000;
    sp_pool p;
    if (sp_pool_new(&o, &p) != SP_OK) {
        printf("sp_pool_new: %s\n", sp_last_error());
        return 1;
    }
    sp_result r;
    s = sp_pool_spawn(p, NULL, 0, &r, NULL);
    printf("spawn: %s: %s\n", sp_status_name(s), s == SP_OK ? "" : sp_last_error());
    if (s == SP_OK) sp_result_free(r);
    fflush(stdout);
    sp_pool_free(p);
    return 0;
}
