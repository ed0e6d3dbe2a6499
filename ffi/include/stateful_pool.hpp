// stateful-pool C++ wrappers over the C ABI (stateful_pool.h): RAII handles and exceptions.
// Header-only, C++17. Hand-written (not generated); every call goes through the C functions.
//
//   stateful_pool::init(&callbacks);               // first thing in main
//   stateful_pool::Pool pool;                      // or Pool(options)
//   stateful_pool::Result hello = pool.spawn("args");
//   stateful_pool::Result r = pool.execute("task");
//   std::string_view bytes = r.view();             // in place in shared memory, until r dies
//
// Errors throw stateful_pool::Error, which carries the sp_status and the library's message.
// Objects are move-only; their destructors release what they hold (a Task's cancels the task if
// it has not started, a Loan's returns its space, a Pool's shuts the pool down gracefully).
// Thread-safety follows the C functions: a Pool may be used from many threads at once; a Task,
// Result or Loan by one thread at a time.

#ifndef STATEFUL_POOL_HPP
#define STATEFUL_POOL_HPP

#include "stateful_pool.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stateful_pool {

/// A failed call: the status and the library's message.
class Error : public std::runtime_error {
  public:
    Error(sp_status status, const std::string &message)
        : std::runtime_error(std::string(sp_status_name(status)) + ": " + message),
          status_(status) {}

    /// The C status code (SP_TASK_FAILED, SP_WORKER_DIED, ...).
    sp_status status() const noexcept { return status_; }

  private:
    sp_status status_;
};

/// Throws an Error for anything but SP_OK.
inline void check(sp_status s) {
    if (s != SP_OK) {
        throw Error(s, sp_last_error());
    }
}

/// Call first thing in main: in a worker process it serves the pool with `callbacks` and never
/// returns. Pass nullptr if this program has no worker of its own.
inline void init(const sp_worker_callbacks *callbacks) { check(sp_init(callbacks)); }

/// Bytes of a task result or a spawn output, read in place; released by the destructor.
class Result {
  public:
    Result() noexcept = default;
    explicit Result(sp_result h) : h_(h) {
        sp_status s = sp_result_bytes(h_, &data_, &size_);
        if (s != SP_OK) {
            std::string message = sp_last_error();
            sp_result_free(std::exchange(h_, sp_result{0}));
            throw Error(s, message);
        }
    }
    Result(Result &&o) noexcept { swap(o); }
    Result &operator=(Result &&o) noexcept {
        Result tmp(std::move(o));
        swap(tmp);
        return *this;
    }
    Result(const Result &) = delete;
    Result &operator=(const Result &) = delete;
    ~Result() {
        if (h_.id != 0) {
            sp_result_free(h_);
        }
    }

    const std::uint8_t *data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    /// The bytes as a string view (valid while this Result lives).
    std::string_view view() const noexcept {
        return {reinterpret_cast<const char *>(data_), size_};
    }
    std::string str() const { return std::string(view()); }

  private:
    void swap(Result &o) noexcept {
        std::swap(h_, o.h_);
        std::swap(data_, o.data_);
        std::swap(size_, o.size_);
    }
    sp_result h_{0};
    const std::uint8_t *data_ = nullptr;
    std::size_t size_ = 0;
};

/// A writable buffer in the pool's shared memory, to send with a task (Pool::submit with a
/// Loan): write it in place, the worker reads it in place.
class Loan {
  public:
    explicit Loan(sp_loan h) : h_(h) {
        sp_status s = sp_loan_data(h_, &data_, &size_);
        if (s != SP_OK) {
            std::string message = sp_last_error();
            sp_loan_free(std::exchange(h_, sp_loan{0}));
            throw Error(s, message);
        }
    }
    Loan(Loan &&o) noexcept { swap(o); }
    Loan &operator=(Loan &&o) noexcept {
        Loan tmp(std::move(o));
        swap(tmp);
        return *this;
    }
    Loan(const Loan &) = delete;
    Loan &operator=(const Loan &) = delete;
    ~Loan() {
        if (h_.id != 0) {
            sp_loan_free(h_);
        }
    }

    std::uint8_t *data() noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    /// Gives up ownership (the caller passes the handle on).
    sp_loan release() noexcept {
        sp_loan h = h_;
        h_ = sp_loan{0};
        data_ = nullptr;
        size_ = 0;
        return h;
    }

  private:
    void swap(Loan &o) noexcept {
        std::swap(h_, o.h_);
        std::swap(data_, o.data_);
        std::swap(size_, o.size_);
    }
    sp_loan h_{0};
    std::uint8_t *data_ = nullptr;
    std::size_t size_ = 0;
};

/// A submitted task. Destroying it without waiting cancels the task if it has not started.
class Task {
  public:
    explicit Task(sp_task h) noexcept : h_(h) {}
    Task(Task &&o) noexcept : h_(std::exchange(o.h_, sp_task{0})) {}
    Task &operator=(Task &&o) noexcept {
        if (this != &o) {
            reset();
            h_ = std::exchange(o.h_, sp_task{0});
        }
        return *this;
    }
    Task(const Task &) = delete;
    Task &operator=(const Task &) = delete;
    ~Task() { reset(); }

    /// Blocks for the result; throws Error if the task failed. The Task is used up.
    Result wait() {
        sp_result r{0};
        sp_status s = sp_task_wait(std::exchange(h_, sp_task{0}), &r);
        check(s);
        return Result(r);
    }

    /// Waits at most `timeout`: nullopt if the task has not finished (wait again later).
    template <class Rep, class Period>
    std::optional<Result> wait_for(std::chrono::duration<Rep, Period> timeout) {
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count();
        sp_result r{0};
        sp_status s = sp_task_wait_timeout(h_, ms < 0 ? 0 : static_cast<std::uint64_t>(ms), &r);
        if (s == SP_TIMEOUT) {
            return std::nullopt;
        }
        h_ = sp_task{0};
        check(s);
        return Result(r);
    }

    /// The result if the task has finished, else nullopt.
    std::optional<Result> poll() {
        sp_result r{0};
        sp_status s = sp_task_poll(h_, &r);
        if (s == SP_PENDING) {
            return std::nullopt;
        }
        h_ = sp_task{0};
        check(s);
        return Result(r);
    }

    /// Asks that the task not run if it has not started (it then fails with SP_CANCELLED).
    void cancel() { check(sp_task_cancel(h_)); }

  private:
    void reset() noexcept {
        if (h_.id != 0) {
            sp_task_free(std::exchange(h_, sp_task{0}));
        }
    }
    sp_task h_{0};
};

/// Pool options: every field starts at 0, the library's default.
struct Options : sp_pool_options {
    Options() : sp_pool_options() { sp_pool_options_init(this); }
};

/// A pool of worker processes. Destroying it shuts it down gracefully (queued tasks finish).
class Pool {
  public:
    explicit Pool(const Options &options = Options()) { check(sp_pool_new(&options, &h_)); }
    Pool(Pool &&o) noexcept : h_(std::exchange(o.h_, sp_pool{0})) {}
    Pool &operator=(Pool &&o) noexcept {
        if (this != &o) {
            reset();
            h_ = std::exchange(o.h_, sp_pool{0});
        }
        return *this;
    }
    Pool(const Pool &) = delete;
    Pool &operator=(const Pool &) = delete;
    ~Pool() { reset(); }

    /// Starts a worker with these spawn argument bytes; returns its spawn output.
    Result spawn(const void *args, std::size_t len) {
        sp_result r{0};
        check(sp_pool_spawn(h_, static_cast<const std::uint8_t *>(args), len, &r, nullptr));
        return Result(r);
    }
    Result spawn(std::string_view args) { return spawn(args.data(), args.size()); }

    /// Starts one worker per element of `args`, concurrently; throws on the first failure.
    std::vector<Result> spawn_many(const std::vector<std::string> &args) {
        std::vector<sp_bytes> in;
        for (const auto &a : args) {
            in.push_back(sp_bytes{reinterpret_cast<const std::uint8_t *>(a.data()), a.size()});
        }
        std::vector<sp_result> outs(args.size(), sp_result{0});
        std::vector<sp_status> statuses(args.size(), SP_OK);
        sp_status s = sp_pool_spawn_many(h_, in.data(), in.size(), outs.data(), statuses.data());
        std::vector<Result> results;
        for (std::size_t i = 0; i < outs.size(); i++) {
            if (statuses[i] == SP_OK) {
                results.emplace_back(outs[i]);
            }
        }
        check(s);
        return results;
    }

    /// Queues a task (a copy of the bytes), waiting for room if the queue is full.
    Task submit(const void *task, std::size_t len) {
        sp_task t{0};
        check(sp_pool_submit(h_, static_cast<const std::uint8_t *>(task), len, &t));
        return Task(t);
    }
    Task submit(std::string_view task) { return submit(task.data(), task.size()); }

    /// Queues a task with a loaned payload (the loan is used up).
    Task submit(std::string_view task, Loan &&payload) {
        sp_task t{0};
        check(sp_pool_submit_loan(h_, reinterpret_cast<const std::uint8_t *>(task.data()),
                                  task.size(), payload.release(), &t));
        return Task(t);
    }

    /// Queues a task, or returns nullopt at once if the queue is full.
    std::optional<Task> try_submit(std::string_view task) {
        sp_task t{0};
        sp_status s = sp_pool_try_submit(
            h_, reinterpret_cast<const std::uint8_t *>(task.data()), task.size(), &t);
        if (s == SP_QUEUE_FULL) {
            return std::nullopt;
        }
        check(s);
        return Task(t);
    }

    /// Runs a task and blocks for its result.
    Result execute(const void *task, std::size_t len) {
        sp_result r{0};
        check(sp_pool_execute(h_, static_cast<const std::uint8_t *>(task), len, &r));
        return Result(r);
    }
    Result execute(std::string_view task) { return execute(task.data(), task.size()); }

    /// Lends a buffer of `len` bytes in shared memory.
    Loan loan(std::size_t len) {
        sp_loan l{0};
        check(sp_pool_loan(h_, len, &l));
        return Loan(l);
    }

    std::size_t num_workers() const {
        std::size_t n = 0;
        check(sp_pool_num_workers(h_, &n));
        return n;
    }

    /// Stops the pool (graceful, or cancelling queued tasks); the object stays valid.
    void shutdown(bool immediate = false) { check(sp_pool_shutdown(h_, immediate ? 1 : 0)); }

    sp_pool handle() const noexcept { return h_; }

  private:
    void reset() noexcept {
        if (h_.id != 0) {
            sp_pool_free(std::exchange(h_, sp_pool{0}));
        }
    }
    sp_pool h_{0};
};

}  // namespace stateful_pool

#endif  // STATEFUL_POOL_HPP
