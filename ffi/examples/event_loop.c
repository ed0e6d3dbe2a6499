/* One poll() loop drives many tasks: no thread is parked per task. The host registers every
 * task on a completion queue (sp_task_notify); the queue's descriptor becomes readable when
 * tasks finish; the loop pops (user_data, task) pairs and collects each result without
 * blocking. The same loop could be epoll, libuv (uv_poll_t) or asio (posix::stream_descriptor).
 * Workers are C (this same program) and write their output in place with sp_reply_alloc.
 *
 * Build (static):  cc -std=c11 -I ffi/include ffi/examples/event_loop.c \
 *                     target/release/libstateful_pool_ffi.a -lgcc_s -lutil -lrt -lpthread -lm -ldl \
 *                     -o event_loop
 */
#define _POSIX_C_SOURCE 200809L
#include "stateful_pool.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int32_t ev_spawn(void *user_data, const sp_worker_info *info, const uint8_t *args,
                        size_t args_len, void **state, sp_reply *reply) {
    (void)user_data;
    (void)args;
    (void)args_len;
    (void)info;
    *state = NULL;
    return sp_reply_write(reply, (const uint8_t *)"ready", 5) == SP_OK ? SP_WORKER_OK
                                                                       : SP_WORKER_ERROR;
}

/* A task is a uint64_t n; the output is the 8-byte n * n, written straight into the reply. */
static int32_t ev_execute(void *state, const sp_task_info *task, sp_reply *reply) {
    (void)state;
    uint64_t n;
    if (task->len != sizeof n) {
        sp_reply_set_error(reply, "a task must be 8 bytes");
        return SP_WORKER_ERROR;
    }
    memcpy(&n, task->data, sizeof n);
    uint8_t *out;
    if (sp_reply_alloc(reply, sizeof n, &out) != SP_OK) {
        return SP_WORKER_ERROR;
    }
    uint64_t sq = n * n;
    memcpy(out, &sq, sizeof sq);
    return SP_WORKER_OK;
}

#define CHECK(call)                                                                          \
    do {                                                                                     \
        sp_status s_ = (call);                                                               \
        if (s_ != SP_OK) {                                                                   \
            fprintf(stderr, "%s failed: %s: %s\n", #call, sp_status_name(s_), sp_last_error()); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

enum { N_TASKS = 1000, IN_FLIGHT = 64 };

int main(void) {
    sp_worker_callbacks cb = {NULL, ev_spawn, ev_execute, NULL, NULL};
    CHECK(sp_init(&cb));

    sp_pool_options opts;
    CHECK(sp_pool_options_init(&opts));
    opts.queue_size = IN_FLIGHT;
    opts.max_workers = 2;
    sp_pool pool;
    CHECK(sp_pool_new(&opts, &pool));
    for (int i = 0; i < 2; i++) {
        sp_result hello;
        CHECK(sp_pool_spawn(pool, NULL, 0, &hello, NULL));
        CHECK(sp_result_free(hello));
    }

    sp_completion_queue cq;
    CHECK(sp_completion_queue_new(&cq));
    int fd;
    CHECK(sp_completion_queue_fd(cq, &fd));

    uint64_t next = 0, done = 0, correct = 0, in_flight = 0;
    while (done < N_TASKS) {
        /* Keep up to IN_FLIGHT tasks queued; never block on a full queue. */
        while (next < N_TASKS && in_flight < IN_FLIGHT) {
            sp_task t;
            sp_status s = sp_pool_submit_with(pool, (const uint8_t *)&next, sizeof next, NULL,
                                              SP_SUBMIT_TRY, &t);
            if (s == SP_QUEUE_FULL) {
                break;
            }
            CHECK(s);
            CHECK(sp_task_notify(t, cq, next)); /* user_data: the task's number */
            next++;
            in_flight++;
        }
        struct pollfd pfd = {fd, POLLIN, 0};
        int n = poll(&pfd, 1, 60000);
        if (n <= 0) {
            fprintf(stderr, "no completion within 60 s\n");
            return 1;
        }
        uint64_t user_data;
        sp_task task;
        sp_status s;
        while ((s = sp_completion_queue_next(cq, &user_data, &task)) == SP_OK) {
            sp_result r;
            CHECK(sp_task_poll(task, &r)); /* finished: returns at once */
            const uint8_t *data;
            size_t len;
            CHECK(sp_result_bytes(r, &data, &len));
            uint64_t sq = 0;
            if (len == sizeof sq) {
                memcpy(&sq, data, sizeof sq);
            }
            correct += sq == user_data * user_data;
            CHECK(sp_result_free(r));
            done++;
            in_flight--;
        }
        if (s != SP_EMPTY) {
            CHECK(s);
        }
    }
    printf("event loop: %" PRIu64 " of %d results correct\n", correct, N_TASKS);
    CHECK(sp_completion_queue_free(cq));
    CHECK(sp_pool_free(pool));
    printf("done\n");
    return correct == N_TASKS ? 0 : 1;
}
