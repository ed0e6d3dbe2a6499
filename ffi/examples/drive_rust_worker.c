/* A C host driving workers written in Rust: the pool starts another program (the Rust example
 * `rust_worker`, whose messages are bytes) as its workers. Usage: drive_rust_worker PATH
 *
 * Build (shared):  cc -std=c11 -I ffi/include ffi/examples/drive_rust_worker.c \
 *                     -L target/release -lstateful_pool_ffi -Wl,-rpath,target/release \
 *                     -o drive_rust_worker
 */
#include "stateful_pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                          \
    do {                                                                                     \
        sp_status s_ = (call);                                                               \
        if (s_ != SP_OK) {                                                                   \
            fprintf(stderr, "%s: %s: %s\n", #call, sp_status_name(s_), sp_last_error());    \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static void print_result(const char *label, sp_result r) {
    const uint8_t *data;
    size_t len;
    CHECK(sp_result_bytes(r, &data, &len));
    printf("%s%.*s\n", label, (int)len, (const char *)data);
    CHECK(sp_result_free(r));
}

int main(int argc, char **argv) {
    /* This program has no C worker of its own; sp_init(NULL) is still the right first call. */
    CHECK(sp_init(NULL));
    if (argc != 2) {
        fprintf(stderr, "usage: %s PATH-TO-RUST-WORKER\n", argv[0]);
        return 2;
    }
    sp_pool_options opts;
    CHECK(sp_pool_options_init(&opts));
    opts.program = argv[1];
    opts.queue_size = 128; /* a task holds its slot until its result is collected */
    sp_pool pool;
    CHECK(sp_pool_new(&opts, &pool));

    /* Two workers at once, each with its own argument bytes. */
    sp_bytes args[2] = {{(const uint8_t *)"alpha", 5}, {(const uint8_t *)"beta", 4}};
    sp_result hellos[2];
    sp_status statuses[2];
    CHECK(sp_pool_spawn_many(pool, args, 2, hellos, statuses));
    for (int i = 0; i < 2; i++) {
        print_result("spawned: ", hellos[i]);
    }

    sp_result r;
    const char *text = "hello from c";
    CHECK(sp_pool_execute(pool, (const uint8_t *)text, strlen(text), &r));
    print_result("upper: ", r);

    /* 100 tasks in flight, then every result checked. */
    enum { N = 100 };
    sp_task tasks[N];
    char buf[32];
    for (int i = 0; i < N; i++) {
        int n = snprintf(buf, sizeof buf, "task %d", i);
        CHECK(sp_pool_submit(pool, (const uint8_t *)buf, (size_t)n, &tasks[i]));
    }
    int ok = 0;
    for (int i = 0; i < N; i++) {
        CHECK(sp_task_wait(tasks[i], &r));
        const uint8_t *data;
        size_t len;
        CHECK(sp_result_bytes(r, &data, &len));
        int n = snprintf(buf, sizeof buf, "TASK %d", i);
        ok += (len == (size_t)n && memcmp(data, buf, len) == 0);
        CHECK(sp_result_free(r));
    }
    printf("%d of %d results correct\n", ok, N);

    /* The Rust worker refuses an empty task with an error. */
    sp_status s = sp_pool_execute(pool, NULL, 0, &r);
    printf("empty task: %s: %s\n", sp_status_name(s), sp_last_error());

    CHECK(sp_pool_shutdown(pool, 0));
    CHECK(sp_pool_free(pool));
    printf("done\n");
    return 0;
}
