// Worker threads kept between calls. Starting and joining a thread costs ~70 us on the machines measured,
// which a kernel call on a few MB of frames would otherwise pay for every helper, every call.
//
// One job at a time: a call that finds the pool busy (an async save encoding in the background while the
// training thread loads, say) starts fresh threads for itself instead of waiting. After fork() the child
// has none of the parent's threads, so it forgets the pool (leaking it: its mutexes may have been held by
// threads that no longer exist) and builds a new one on first use.
#include <pthread.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <system_error>

#include "native.h"

namespace shardckpt {
namespace {

class Pool {
   public:
    // Runs job(0) on the caller and job(1..workers-1) on pool threads; false if the pool is busy.
    bool try_run(int workers, const std::function<void(int)>& job) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (!busy.owns_lock()) return false;
        grow(workers - 1);
        int helpers = std::min<int>(workers - 1, static_cast<int>(started_));
        {
            std::lock_guard<std::mutex> g(mu_);
            job_ = &job;
            wanted_ = helpers;
            remaining_ = helpers;
            ++generation_;
        }
        if (helpers) cv_.notify_all();
        job(0);
        std::unique_lock<std::mutex> g(mu_);
        done_.wait(g, [&] { return remaining_ == 0; });
        job_ = nullptr;
        return true;
    }

   private:
    void grow(int want) {
        uint64_t now;
        {
            std::lock_guard<std::mutex> g(mu_);
            now = generation_;  // a new thread waits for the generation after this one: the coming job
        }
        while (static_cast<int>(started_) < want) {
            int index = static_cast<int>(started_) + 1;
            try {
                std::thread([this, index, now] { loop(index, now); }).detach();
            } catch (const std::system_error&) {
                return;  // run the job on the threads there are
            }
            ++started_;
        }
    }

    void loop(int index, uint64_t seen) {
        std::unique_lock<std::mutex> g(mu_);
        for (;;) {
            cv_.wait(g, [&] { return generation_ != seen; });
            seen = generation_;
            if (index > wanted_) continue;  // this job needs fewer helpers
            const std::function<void(int)>* job = job_;
            g.unlock();
            (*job)(index);
            g.lock();
            if (--remaining_ == 0) done_.notify_one();
        }
    }

    std::mutex busy_;  // held for the whole of one job
    std::mutex mu_;    // guards the fields below
    std::condition_variable cv_, done_;
    const std::function<void(int)>* job_ = nullptr;
    uint64_t generation_ = 0;
    int wanted_ = 0;
    int remaining_ = 0;
    size_t started_ = 0;  // only touched with busy_ held
};

pthread_mutex_t g_create = PTHREAD_MUTEX_INITIALIZER;
Pool* g_pool = nullptr;

void forget_after_fork() {
    g_create = PTHREAD_MUTEX_INITIALIZER;
    g_pool = nullptr;
}

Pool* pool() {
    pthread_mutex_lock(&g_create);
    if (!g_pool) {
        static bool registered = false;
        if (!registered) {
            pthread_atfork(nullptr, nullptr, forget_after_fork);
            registered = true;
        }
        g_pool = new Pool();  // never deleted: idle threads wait on it until the process exits
    }
    Pool* p = g_pool;
    pthread_mutex_unlock(&g_create);
    return p;
}

}  // namespace

void run_workers(int workers, const std::function<void(int)>& job) {
    if (workers <= 1) {
        job(0);
        return;
    }
    if (pool()->try_run(workers, job)) return;
    std::vector<std::thread> threads;  // the pool is busy with another call: threads of our own
    threads.reserve(workers - 1);
    for (int w = 1; w < workers; ++w) {
        try {
            threads.emplace_back(job, w);
        } catch (const std::system_error&) {
            break;
        }
    }
    job(0);
    for (auto& t : threads) t.join();
}

}  // namespace shardckpt
