// A C++ worker class behind stateful_pool::worker_callbacks<W>(): exceptions thrown by the
// worker (its constructor is the spawn step, execute runs tasks) are caught at the C boundary
// and come back to the host as the task's or spawn's error. The host side uses the newer
// wrappers: batches, broadcast, a completion queue, per-task options.
//
// Build:  c++ -std=c++17 -I ffi/include ffi/examples/cpp_worker.cpp -L target/release
//             -lstateful_pool_ffi -Wl,-rpath,target/release -lpthread -o cpp_worker
#include "stateful_pool.hpp"

#include <poll.h>

#include <cctype>
#include <chrono>
#include <iostream>
#include <thread>
#include <stdexcept>
#include <string>

namespace {

struct Shouter {
    std::string name;
    Shouter(const sp_worker_info &info, std::string_view args, stateful_pool::Reply &out)
        : name(args) {
        if (name == "refuse") {
            throw std::invalid_argument("this worker refuses to start");
        }
        out.write(name + " on seat " + std::to_string(info.index));
    }

    void execute(const sp_task_info &task, stateful_pool::Reply &out) {
        std::string_view t(reinterpret_cast<const char *>(task.data), task.len);
        if (t == "throw") {
            throw std::runtime_error("boom from C++");
        }
        if (t == "throw-int") {
            throw 42;
        }
        if (t == "poison") {
            throw stateful_pool::Poisoned("device lost");
        }
        std::uint8_t *p = out.alloc(t.size());  // the output, written in place
        for (std::size_t i = 0; i < t.size(); i++) {
            p[i] = static_cast<std::uint8_t>(std::toupper(static_cast<unsigned char>(t[i])));
        }
    }
};

}  // namespace

int main() {
    auto cb = stateful_pool::worker_callbacks<Shouter>();
    stateful_pool::init(&cb);

    stateful_pool::Options opts;
    opts.max_workers = 3;
    stateful_pool::Pool pool(opts);
    std::cout << "spawned: " << pool.spawn("ada").view() << "\n";
    std::cout << "spawned: " << pool.spawn_with("bob", {1}, {"SHOUT=1"}).view() << "\n";
    try {
        pool.spawn("refuse");
    } catch (const stateful_pool::Error &e) {
        std::cout << "spawn error: " << e.what() << "\n";
    }

    std::cout << "execute: " << pool.execute("hello").view() << "\n";
    for (const char *t : {"throw", "throw-int", "poison"}) {
        try {
            pool.execute(t);
        } catch (const stateful_pool::Error &e) {
            std::cout << t << ": " << e.what() << "\n";
        }
    }

    stateful_pool::ResultSet set = pool.submit_batch({"a", "throw", "c"}).wait();
    for (std::size_t i = 0; i < set.size(); i++) {
        sp_outcome o = set[i];
        std::cout << "batch[" << i << "]: " << sp_status_name(o.status) << " "
                  << (o.status == SP_OK ? std::string(set.value(i)) : std::string(o.message))
                  << "\n";
    }
    // The poisoned worker is being replaced: wait (bounded) until both serve again, so the
    // broadcast reaches both.
    for (int i = 0; i < 6000 && pool.num_workers() < 2; i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    stateful_pool::ResultSet all = pool.broadcast("ping");
    std::cout << "broadcast: " << all.size() << " workers answered\n";

    stateful_pool::CompletionQueue cq;
    sp_task_options o{};
    o.timeout_ms = 60000;
    std::optional<stateful_pool::Task> t = pool.submit_with("queued", o);
    cq.notify(*t, 7);
    pollfd pfd{cq.fd(), POLLIN, 0};
    if (poll(&pfd, 1, 60000) == 1) {
        std::optional<std::uint64_t> ud = cq.next();
        std::cout << "completion: " << (ud ? *ud : 0) << " -> " << t->wait().view() << "\n";
    }
    std::cout << "done\n";
}
