// A C++ host with the RAII wrappers (stateful_pool.hpp) and a worker written in C++ (this same
// program, started again as a worker). Shows spawn outputs, submits from several threads, a
// zero-copy payload through a loan, a failing task as an exception, callbacks that catch their
// own exceptions, and a wait with a timeout.
//
// Build:  c++ -std=c++17 -I ffi/include ffi/examples/host.cpp -L target/release
//             -lstateful_pool_ffi -Wl,-rpath,target/release -lpthread -o host
#include "stateful_pool.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace {

// The worker's state: its name and how many tasks it served.
struct Worker {
    std::string name;
    unsigned long served = 0;
};

int32_t reply_text(sp_reply *reply, const std::string &s) {
    sp_reply_write(reply, reinterpret_cast<const uint8_t *>(s.data()), s.size());
    return SP_WORKER_OK;
}

// Tasks: "echo:<text>", "sum" (adds up the loaned payload's bytes), "sleep:<ms>", "fail".
int32_t execute_task(Worker *w, const sp_task_info *task, sp_reply *reply) {
    w->served++;
    std::string_view t(reinterpret_cast<const char *>(task->data), task->len);
    if (t.rfind("echo:", 0) == 0) {
        return reply_text(reply, std::string(t.substr(5)));
    }
    if (t == "sum") {
        unsigned long long sum = 0;
        for (size_t i = 0; i < task->payload_len; i++) {
            sum += task->payload[i];  // the payload, read in place in shared memory
        }
        return reply_text(reply, std::to_string(sum));
    }
    if (t.rfind("sleep:", 0) == 0) {
        // std::stoi throws on "sleep:x": the callback below turns that into a failed task.
        std::this_thread::sleep_for(std::chrono::milliseconds(std::stoi(std::string(t.substr(6)))));
        return reply_text(reply, "slept");
    }
    sp_reply_set_error(reply, ("cannot do \"" + std::string(t) + "\"").c_str());
    return SP_WORKER_ERROR;
}

// Callbacks must not throw: an exception escaping one aborts the worker process (the pool sees
// a worker death). Each callback body runs inside this, which turns an exception into the
// callback's error reply.
template <typename F>
int32_t no_throw(sp_reply *reply, F body) {
    try {
        return body();
    } catch (const std::exception &e) {
        sp_reply_set_error(reply, e.what());
    } catch (...) {
        sp_reply_set_error(reply, "unknown C++ exception");
    }
    return SP_WORKER_ERROR;
}

int32_t worker_spawn(void *, const sp_worker_info *info, const uint8_t *args, size_t len,
                     void **state, sp_reply *reply) {
    return no_throw(reply, [&] {
        auto *w = new Worker{std::string(reinterpret_cast<const char *>(args), len)};
        *state = w;
        return reply_text(reply, w->name + " ready on seat " + std::to_string(info->index));
    });
}

int32_t worker_execute(void *state, const sp_task_info *task, sp_reply *reply) {
    return no_throw(reply, [&] { return execute_task(static_cast<Worker *>(state), task, reply); });
}

void worker_drop(void *state) { delete static_cast<Worker *>(state); }

}  // namespace

int main() {
    sp_worker_callbacks callbacks{nullptr, worker_spawn, worker_execute, worker_drop, nullptr};
    stateful_pool::init(&callbacks);  // workers branch off here: keep it first

    namespace sp = stateful_pool;
    sp::Options options;
    options.queue_size = 64;
    sp::Pool pool(options);
    for (const auto &hello : pool.spawn_many({"ada", "grace"})) {
        std::cout << "spawned: " << hello.view() << "\n";
    }

    // Four threads share the pool.
    std::atomic<int> correct{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) {
        threads.emplace_back([&pool, &correct, t] {
            for (int i = 0; i < 50; i++) {
                std::string text = std::to_string(t) + "-" + std::to_string(i);
                sp::Result r = pool.submit("echo:" + text).wait();
                correct += r.view() == text;
            }
        });
    }
    for (auto &th : threads) {
        th.join();
    }
    std::cout << "threads: " << correct << " of 200 echoes correct\n";

    // A 1 MiB payload written once, in place, and read in place by the worker.
    sp::Loan loan = pool.loan(1 << 20);
    for (size_t i = 0; i < loan.size(); i++) {
        loan.data()[i] = static_cast<uint8_t>(i % 7);
    }
    unsigned long long expect = 0;
    for (size_t i = 0; i < loan.size(); i++) {
        expect += i % 7;
    }
    sp::Result sum = pool.submit("sum", std::move(loan)).wait();
    std::cout << "payload sum: " << sum.view() << (sum.str() == std::to_string(expect) ? " (correct)" : " (WRONG)")
              << "\n";

    // A failing task is an exception carrying the status and the worker's message.
    try {
        pool.execute("fly");
        std::cout << "no error?\n";
    } catch (const sp::Error &e) {
        std::cout << "error: " << e.what() << "\n";
    }

    // So is a C++ exception inside a callback, caught there (std::stoi throws on "x").
    try {
        pool.execute("sleep:x");
        std::cout << "no error?\n";
    } catch (const sp::Error &e) {
        std::cout << "exception in the worker: " << e.what() << "\n";
    }

    // Waiting with a timeout.
    sp::Task slow = pool.submit("sleep:300");
    auto early = slow.wait_for(std::chrono::milliseconds(1));
    std::cout << "after 1 ms: " << (early ? "finished" : "still running") << "\n";
    std::optional<sp::Result> late;
    while (!(late = slow.wait_for(std::chrono::seconds(10)))) {
    }
    std::cout << "then: " << late->view() << "\n";
    // A bound under a millisecond waits (rounded up), and one too long to count waits forever.
    sp::Task quick = pool.submit("sleep:1");
    while (!quick.wait_for(std::chrono::microseconds(500))) {
    }
    sp::Task endless = pool.submit("sleep:1");
    auto got = endless.wait_for(std::chrono::seconds::max());
    std::cout << "a wait of seconds::max(): " << (got ? got->view() : "nothing?") << "\n";

    // A pool moved from: its calls throw with the call's own status.
    sp::Pool moved = std::move(pool);
    try {
        pool.spawn_many({"x"});
        std::cout << "no error?\n";
    } catch (const sp::Error &e) {
        std::cout << "moved-from pool: " << e.what() << "\n";
    }
    pool = std::move(moved);

    pool.shutdown();
    std::cout << "done\n";
    return 0;
}
