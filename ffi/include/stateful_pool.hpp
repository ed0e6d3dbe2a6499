// stateful-pool C++ wrappers over the C ABI (stateful_pool.h): RAII handles and exceptions.
// Header-only, C++17. Hand-written (not generated); every call goes through the C functions.
//
//   stateful_pool::init(&callbacks);               // first thing in main
//   stateful_pool::Pool pool;                      // or Pool(options)
//   stateful_pool::Result hello = pool.spawn("args");
//   stateful_pool::Result r = pool.execute("task");
//   std::string_view bytes = r.view();             // no copy, valid until r dies
//
// Errors throw stateful_pool::Error, which carries the sp_status and the library's message.
// C++ workers: worker_callbacks<W>() makes C callbacks from a class; an exception thrown inside
// is caught at the boundary and becomes the task's (or spawn's) error, never an unwind into C.
// Objects are move-only; their destructors release what they hold (a Task's cancels the task if
// it has not started, a Loan's returns its space, a Pool's shuts the pool down gracefully).
// Thread-safety follows the C functions: a Pool may be used from many threads at once; a Task,
// Result or Loan by one thread at a time.

#ifndef STATEFUL_POOL_HPP
#define STATEFUL_POOL_HPP

#include "stateful_pool.h"

#include <chrono>
#include <exception>
#include <new>
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

/// Thrown from a C++ worker's execute to declare the worker unusable (SP_WORKER_POISONED: the
/// task fails with SP_POISONED and the worker process is replaced).
class Poisoned : public std::runtime_error {
  public:
    explicit Poisoned(const std::string &message) : std::runtime_error(message) {}
};

/// A callback's output (wraps the sp_reply it was given; valid during the callback only).
class Reply {
  public:
    explicit Reply(sp_reply *r) noexcept : r_(r) {}
    /// Appends bytes to the output.
    void write(const void *data, std::size_t len) {
        check(sp_reply_write(r_, static_cast<const std::uint8_t *>(data), len));
    }
    void write(std::string_view s) { write(s.data(), s.size()); }
    /// Appends `len` zeroed bytes and returns their address, to write the output in place
    /// (valid until the next write/alloc or the callback's return).
    std::uint8_t *alloc(std::size_t len) {
        std::uint8_t *p = nullptr;
        check(sp_reply_alloc(r_, len, &p));
        return p;
    }

  private:
    sp_reply *r_;
};

namespace detail {
/// A wait's bound in whole milliseconds for the C calls: rounded up (a wait of 500 µs waits,
/// it does not merely look), 0 for zero or negative, and `UINT64_MAX` (no deadline) for a
/// bound too long to count in milliseconds (`std::chrono::seconds::max()` waits forever
/// instead of overflowing).
template <class Rep, class Period>
std::uint64_t timeout_ms(std::chrono::duration<Rep, Period> timeout) {
    if (timeout <= std::chrono::duration<Rep, Period>::zero()) {
        return 0;
    }
    const auto ms = std::chrono::duration<long double, std::milli>(timeout).count();
    if (!(ms < 9.0e18L)) {
        return UINT64_MAX;
    }
    return static_cast<std::uint64_t>(std::chrono::ceil<std::chrono::milliseconds>(timeout).count());
}

/// Runs a callback body; any exception becomes the reply's error (never crosses into C).
template <typename F>
std::int32_t guard_callback(sp_reply *reply, F &&body) noexcept {
    try {
        body();
        return SP_WORKER_OK;
    } catch (const Poisoned &e) {
        sp_reply_set_error(reply, e.what());
        return SP_WORKER_POISONED;
    } catch (const std::exception &e) {
        sp_reply_set_error(reply, e.what());
    } catch (...) {
        sp_reply_set_error(reply, "unknown C++ exception");
    }
    return SP_WORKER_ERROR;
}

template <class W>
struct Callbacks {
    static std::int32_t spawn(void *, const sp_worker_info *info, const std::uint8_t *args,
                              std::size_t len, void **state, sp_reply *reply) noexcept {
        return guard_callback(reply, [&] {
            Reply out(reply);
            *state = new W(*info,
                           std::string_view(reinterpret_cast<const char *>(args), len), out);
        });
    }
    static std::int32_t execute(void *state, const sp_task_info *task, sp_reply *reply) noexcept {
        return guard_callback(reply, [&] {
            Reply out(reply);
            static_cast<W *>(state)->execute(*task, out);
        });
    }
    static void drop(void *state) noexcept {
        try {
            delete static_cast<W *>(state);
        } catch (...) {
            // Reached only for a destructor declared noexcept(false): it must not unwind into
            // C (the worker is exiting anyway). A destructor is noexcept by default, and one
            // that throws then ends the worker process through std::terminate (SIGABRT), as
            // a Rust worker's panicking destructor ends it with exit code 1.
        }
    }
};
}  // namespace detail

/// The C callbacks of a C++ worker class W, with every exception caught at the boundary: a
/// throw from W's constructor fails the spawn (SP_SPAWN_FAILED, with e.what()), from
/// W::execute fails the task (SP_TASK_FAILED, or SP_POISONED for Poisoned). W provides:
///   W(const sp_worker_info &info, std::string_view args, Reply &out);   // the spawn step
///   void execute(const sp_task_info &task, Reply &out);                 // one task
/// Use: `auto cb = stateful_pool::worker_callbacks<MyWorker>(); stateful_pool::init(&cb);`
template <class W>
sp_worker_callbacks worker_callbacks() noexcept {
    return sp_worker_callbacks{nullptr, &detail::Callbacks<W>::spawn,
                               &detail::Callbacks<W>::execute, &detail::Callbacks<W>::drop,
                               nullptr};
}

/// Bytes of a task result or a spawn output (the pool's private copy, read without another
/// copy); released by the destructor.
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
    /// The C handle (still owned by this Loan).
    sp_loan get() const noexcept { return h_; }
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
        sp_status s = sp_task_wait(h_, &r);
        if (s != SP_BUSY && s != SP_PANIC) {
            h_ = sp_task{0}; // consumed (a result, or the task's failure)
        }
        check(s);
        return Result(r);
    }

    /// Waits at most `timeout`: nullopt if the task has not finished (wait again later).
    template <class Rep, class Period>
    std::optional<Result> wait_for(std::chrono::duration<Rep, Period> timeout) {
        sp_result r{0};
        sp_status s = sp_task_wait_timeout(h_, detail::timeout_ms(timeout), &r);
        if (s == SP_TIMEOUT) {
            return std::nullopt;
        }
        if (s != SP_BUSY && s != SP_PANIC) {
            h_ = sp_task{0}; // consumed (a result, or the task's failure)
        }
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
        if (s != SP_BUSY && s != SP_PANIC) {
            h_ = sp_task{0}; // consumed (a result, or the task's failure)
        }
        check(s);
        return Result(r);
    }

    /// Asks that the task not run if it has not started (it then fails with SP_CANCELLED).
    void cancel() { check(sp_task_cancel(h_)); }

    /// The C handle (still owned by this Task).
    sp_task handle() const noexcept { return h_; }

  private:
    void reset() noexcept {
        if (h_.id != 0) {
            sp_task_free(std::exchange(h_, sp_task{0}));
        }
    }
    sp_task h_{0};
};

/// Many outcomes (a batch's, in task order; a broadcast's, one per worker); released by the
/// destructor. Outcomes' bytes and messages are valid while the set lives.
class ResultSet {
  public:
    explicit ResultSet(sp_result_set h) noexcept : h_(h) {}
    ResultSet(ResultSet &&o) noexcept : h_(std::exchange(o.h_, sp_result_set{0})) {}
    ResultSet &operator=(ResultSet &&o) noexcept {
        if (this != &o) {
            sp_result_set_free(h_);
            h_ = std::exchange(o.h_, sp_result_set{0});
        }
        return *this;
    }
    ResultSet(const ResultSet &) = delete;
    ResultSet &operator=(const ResultSet &) = delete;
    ~ResultSet() { sp_result_set_free(h_); }  // a zero handle is a no-op

    std::size_t size() const {
        std::size_t n = 0;
        check(sp_result_set_len(h_, &n));
        return n;
    }
    /// Outcome i: status, worker (broadcast) or SIZE_MAX (batch), bytes or message.
    sp_outcome operator[](std::size_t i) const {
        sp_outcome o{};
        check(sp_result_set_get(h_, i, &o));
        return o;
    }
    /// Outcome i's bytes as a view; throws Error with its status and message if it failed.
    std::string_view value(std::size_t i) const {
        sp_outcome o = (*this)[i];
        if (o.status != SP_OK) {
            throw Error(o.status, o.message);
        }
        return {reinterpret_cast<const char *>(o.data), o.len};
    }

  private:
    sp_result_set h_{0};
};

/// A submitted batch. Destroying it without waiting cancels it if it has not started.
class Batch {
  public:
    explicit Batch(sp_batch h) noexcept : h_(h) {}
    Batch(Batch &&o) noexcept : h_(std::exchange(o.h_, sp_batch{0})) {}
    Batch &operator=(Batch &&o) noexcept {
        if (this != &o) {
            sp_batch_free(h_);
            h_ = std::exchange(o.h_, sp_batch{0});
        }
        return *this;
    }
    Batch(const Batch &) = delete;
    Batch &operator=(const Batch &) = delete;
    ~Batch() { sp_batch_free(h_); }

    /// Blocks for every task's outcome; throws Error if the batch failed as a whole.
    ResultSet wait() {
        sp_result_set r{0};
        sp_status s = sp_batch_wait(h_, &r);
        if (s != SP_BUSY && s != SP_PANIC) {
            h_ = sp_batch{0}; // consumed (the outcomes, or the batch's failure)
        }
        check(s);
        return ResultSet(r);
    }
    /// Waits at most `timeout`: nullopt if the batch has not finished.
    template <class Rep, class Period>
    std::optional<ResultSet> wait_for(std::chrono::duration<Rep, Period> timeout) {
        sp_result_set r{0};
        sp_status s = sp_batch_wait_timeout(h_, detail::timeout_ms(timeout), &r);
        if (s == SP_TIMEOUT) {
            return std::nullopt;
        }
        if (s != SP_BUSY && s != SP_PANIC) {
            h_ = sp_batch{0}; // consumed (the outcomes, or the batch's failure)
        }
        check(s);
        return ResultSet(r);
    }

  private:
    sp_batch h_{0};
};

/// A completion queue for an event loop: watch fd(), then pop with next().
class CompletionQueue {
  public:
    CompletionQueue() { check(sp_completion_queue_new(&h_)); }
    CompletionQueue(CompletionQueue &&o) noexcept
        : h_(std::exchange(o.h_, sp_completion_queue{0})) {}
    CompletionQueue &operator=(CompletionQueue &&o) noexcept {
        if (this != &o) {
            sp_completion_queue_free(h_);
            h_ = std::exchange(o.h_, sp_completion_queue{0});
        }
        return *this;
    }
    CompletionQueue(const CompletionQueue &) = delete;
    CompletionQueue &operator=(const CompletionQueue &) = delete;
    ~CompletionQueue() { sp_completion_queue_free(h_); }

    /// The eventfd, readable while completions are pending (do not close it).
    int fd() const {
        int fd = -1;
        check(sp_completion_queue_fd(h_, &fd));
        return fd;
    }
    /// Asks that (user_data, task) be pushed here when the task finishes. The Task stays yours.
    void notify(const Task &task, std::uint64_t user_data) {
        check(sp_task_notify(task.handle(), h_, user_data));
    }
    /// The oldest completion's user_data, or nullopt if none is pending (never blocks).
    std::optional<std::uint64_t> next() {
        std::uint64_t user_data = 0;
        sp_task task{0};
        sp_status s = sp_completion_queue_next(h_, &user_data, &task);
        if (s == SP_EMPTY) {
            return std::nullopt;
        }
        check(s);
        return user_data;
    }
    sp_completion_queue handle() const noexcept { return h_; }

  private:
    sp_completion_queue h_{0};
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
        // Only the outputs the call wrote (a refusal before any spawn started writes none:
        // then the call's own status is what is thrown). Each is owned, and freed if we throw.
        std::vector<Result> results;
        for (std::size_t i = 0; i < outs.size(); i++) {
            if (statuses[i] == SP_OK && outs[i].id != 0) {
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
    /// On failure the loan stays with `payload` (still filled), as in C.
    Task submit(std::string_view task, Loan &&payload) {
        sp_task t{0};
        check(sp_pool_submit_loan(h_, reinterpret_cast<const std::uint8_t *>(task.data()),
                                  task.size(), payload.get(), &t));
        payload.release(); // consumed by the successful submit
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

    /// Queues a task with its own options (timeout, retries) and flags (SP_SUBMIT_TRY);
    /// nullopt if SP_SUBMIT_TRY found the queue full.
    std::optional<Task> submit_with(std::string_view task, const sp_task_options &opts,
                                    std::int32_t flags = 0) {
        sp_task t{0};
        sp_status s = sp_pool_submit_with(h_, reinterpret_cast<const std::uint8_t *>(task.data()),
                                          task.size(), &opts, flags, &t);
        if (s == SP_QUEUE_FULL && (flags & SP_SUBMIT_TRY) != 0) {
            return std::nullopt;
        }
        check(s);
        return Task(t);
    }

    /// Queues the tasks as one batch (copies of the bytes).
    Batch submit_batch(const std::vector<std::string> &tasks,
                       const sp_task_options *opts = nullptr) {
        std::vector<sp_bytes> in;
        for (const auto &t : tasks) {
            in.push_back(sp_bytes{reinterpret_cast<const std::uint8_t *>(t.data()), t.size()});
        }
        sp_batch b{0};
        check(sp_pool_submit_batch(h_, in.data(), in.size(), opts, 0, &b));
        return Batch(b);
    }

    /// Runs the task once on every serving worker; one outcome per worker.
    ResultSet broadcast(std::string_view task) {
        sp_result_set r{0};
        check(sp_pool_broadcast(h_, reinterpret_cast<const std::uint8_t *>(task.data()),
                                task.size(), &r));
        return ResultSet(r);
    }

    /// Starts a worker that owns `gpus`, gets `env` ("KEY=VALUE" strings) in its process and,
    /// if `cpus` is not empty, is pinned to those CPUs.
    Result spawn_with(std::string_view args, const std::vector<std::uint32_t> &gpus,
                      const std::vector<std::string> &env = {},
                      const std::vector<std::size_t> &cpus = {}) {
        std::vector<const char *> e;
        for (const auto &kv : env) {
            e.push_back(kv.c_str());
        }
        sp_spawn_options o{};
        o.gpus = gpus.data();
        o.gpus_len = gpus.size();
        o.env = e.data();
        o.env_len = e.size();
        o.cpus = cpus.data();
        o.cpus_len = cpus.size();
        sp_result r{0};
        check(sp_pool_spawn_with(h_, reinterpret_cast<const std::uint8_t *>(args.data()),
                                 args.size(), &o, &r, nullptr));
        return Result(r);
    }

    /// Retires worker `index` (blocks until it is gone).
    void retire_worker(std::size_t index) { check(sp_pool_retire_worker(h_, index)); }

    /// Replaces worker `index` with a fresh one; returns its spawn output.
    Result replace_worker(std::size_t index) {
        sp_result r{0};
        check(sp_pool_replace_worker(h_, index, &r));
        return Result(r);
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
