/* The seed's square example in C: a C host whose workers are C too (this same program, started
 * again as a worker process). Each worker gets its "GPU ids" as spawn arguments; tasks are
 * 8-byte integers; results are text.
 *
 * Build (static):  cc -std=c11 -I ffi/include ffi/examples/square.c \
 *                     target/release/libstateful_pool_ffi.a -lgcc_s -lutil -lrt -lpthread -lm -ldl \
 *                     -o square
 */
#include "stateful_pool.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A worker's state: the GPU ids it was spawned with (a real worker would load a model onto
 * them here, once). */
typedef struct square_worker {
    char gpus[64];
    uint64_t served;
} square_worker;

static int32_t square_spawn(void *user_data, const sp_worker_info *info, const uint8_t *args,
                            size_t args_len, void **state, sp_reply *reply) {
    (void)user_data;
    square_worker *w = calloc(1, sizeof *w);
    if (w == NULL) {
        sp_reply_set_error(reply, "out of memory");
        return SP_WORKER_ERROR;
    }
    snprintf(w->gpus, sizeof w->gpus, "%.*s", (int)args_len, (const char *)args);
    *state = w;
    char msg[128];
    int n = snprintf(msg, sizeof msg, "Worker %zu initialized on GPU: %s", info->index, w->gpus);
    sp_reply_write(reply, (const uint8_t *)msg, (size_t)n);
    return SP_WORKER_OK;
}

static int32_t square_execute(void *state, const sp_task_info *task, sp_reply *reply) {
    square_worker *w = state;
    int64_t v;
    if (task->len != sizeof v) {
        sp_reply_set_error(reply, "a task must be an 8-byte integer");
        return SP_WORKER_ERROR;
    }
    memcpy(&v, task->data, sizeof v); /* read in place in shared memory */
    w->served++;
    char msg[128];
    int n = snprintf(msg, sizeof msg, "Square of %" PRId64 " is %" PRId64 " (GPU %s)", v, v * v,
                     w->gpus);
    sp_reply_write(reply, (const uint8_t *)msg, (size_t)n);
    return SP_WORKER_OK;
}

static void square_drop(void *state) { free(state); }

#define CHECK(call)                                                                          \
    do {                                                                                     \
        sp_status s_ = (call);                                                               \
        if (s_ != SP_OK) {                                                                   \
            fprintf(stderr, "%s: %s: %s\n", #call, sp_status_name(s_), sp_last_error());    \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

/* Prints a result's bytes (read in place) and releases it. */
static void print_result(sp_result r) {
    const uint8_t *data;
    size_t len;
    CHECK(sp_result_bytes(r, &data, &len));
    printf("%.*s\n", (int)len, (const char *)data);
    CHECK(sp_result_free(r));
}

int main(void) {
    /* Workers branch off here: keep it first. */
    sp_worker_callbacks callbacks = {NULL, square_spawn, square_execute, square_drop, NULL};
    CHECK(sp_init(&callbacks));

    sp_pool_options opts;
    CHECK(sp_pool_options_init(&opts));
    opts.queue_size = 100;
    sp_pool pool;
    CHECK(sp_pool_new(&opts, &pool));

    const char *gpus[2] = {"[0, 1]", "[2, 3]"};
    for (int i = 0; i < 2; i++) {
        sp_result hello;
        CHECK(sp_pool_spawn(pool, (const uint8_t *)gpus[i], strlen(gpus[i]), &hello, NULL));
        print_result(hello);
    }

    int64_t v = 100;
    sp_result r;
    CHECK(sp_pool_execute(pool, (const uint8_t *)&v, sizeof v, &r)); /* blocking call */
    print_result(r);

    sp_task tasks[8];
    for (int64_t i = 0; i < 8; i++) {
        CHECK(sp_pool_submit(pool, (const uint8_t *)&i, sizeof i, &tasks[i]));
    }
    for (int i = 0; i < 8; i++) {
        CHECK(sp_task_wait(tasks[i], &r));
        print_result(r);
    }

    /* A worker's error comes back as a status and a message. */
    sp_status s = sp_pool_execute(pool, (const uint8_t *)"bad", 3, &r);
    printf("bad task: %s: %s\n", sp_status_name(s), sp_last_error());

    CHECK(sp_pool_free(pool)); /* graceful shutdown */
    printf("done\n");
    return 0;
}
