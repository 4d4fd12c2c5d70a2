// A C interface to gloo (Facebook's collective library, the one behind PyTorch's gloo
// backend) for the Rust gloo backend: a context whose TCP pairs connect to addresses that the
// job's own rendezvous exchanged (so no gloo Store is needed), and the four collectives the
// communicator uses. Every gloo exception becomes an error code and a message.

#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/context.h>
#include <gloo/gather.h>
#include <gloo/math.h>
#include <gloo/transport/context.h>
#include <gloo/transport/tcp/device.h>

#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {

// gloo::Context with its transport context built here: each pair's address is read before any
// peer is known, and each pair is connected once the peers' addresses have been exchanged.
class ExchangedContext : public gloo::Context {
 public:
  ExchangedContext(int rank, int size) : gloo::Context(rank, size) {}

  // Creates one pair per peer; returns their addresses, in peer order, this rank skipped.
  std::vector<char> createPairs(std::shared_ptr<gloo::transport::Device> device,
                                int localRank) {
    device_ = device;
    transportContext_ = device->createContext(rank, size);
    transportContext_->setTimeout(getTimeout());
    std::vector<char> addresses;
    for (int peer = 0; peer < size; peer++) {
      if (peer == rank) continue;
      auto& pair = transportContext_->createPair(peer);
      pair->setLocalRank(localRank);
      auto bytes = pair->address().bytes();
      addresses.insert(addresses.end(), bytes.begin(), bytes.end());
    }
    return addresses;
  }

  void connect(int peer, const std::vector<char>& address) {
    transportContext_->getPair(peer)->connect(address);
  }
};

struct Handle {
  std::shared_ptr<ExchangedContext> context;
  std::vector<char> addresses;
};

thread_local std::string last_error;

int failed(const std::exception& e) {
  last_error = e.what();
  return -1;
}

// Runs `body`: 0, or -1 with gloo's message kept for gfn_gloo_last_error.
template <typename Body>
int guarded(Body body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    return failed(e);
  }
}

Handle* handle(void* h) { return static_cast<Handle*>(h); }

}  // namespace

extern "C" {

const char* gfn_gloo_last_error() { return last_error.c_str(); }

// Where the gloo functions this file calls were resolved from: libtorch bundles its own
// gloo, and a mix of the two copies would be undefined behaviour.
const char* gfn_gloo_library() {
  Dl_info info;
  auto allreduce = reinterpret_cast<void*>(&gloo::allreduce);
  if (dladdr(allreduce, &info) == 0 || info.dli_fname == nullptr) return "";
  return info.dli_fname;
}

// This rank's TCP device (bound to `host`, or to interface `iface` when not empty) and one
// pair per peer. Null on failure (see gfn_gloo_last_error).
void* gfn_gloo_create(int rank, int size, int local_rank, const char* host, const char* iface,
                      int64_t timeout_ms) {
  try {
    gloo::transport::tcp::attr attr;
    if (iface != nullptr && *iface != '\0') {
      attr.iface = iface;
    } else {
      attr.hostname = host;
    }
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto h = std::make_unique<Handle>();
    h->context = std::make_shared<ExchangedContext>(rank, size);
    // Every collective's deadline: gloo's options start from the context's timeout.
    h->context->setTimeout(std::chrono::milliseconds(timeout_ms));
    h->addresses = h->context->createPairs(device, local_rank);
    return h.release();
  } catch (const std::exception& e) {
    failed(e);
    return nullptr;
  }
}

// The pairs' addresses to announce (every peer's pair, in peer order).
const char* gfn_gloo_addresses(void* h, size_t* len) {
  *len = handle(h)->addresses.size();
  return handle(h)->addresses.data();
}

int gfn_gloo_connect(void* h, int peer, const char* address, size_t len) {
  return guarded([&] {
    handle(h)->context->connect(peer, std::vector<char>(address, address + len));
  });
}

int gfn_gloo_allreduce_sum_f32(void* h, float* data, size_t n) {
  return guarded([&] {
    gloo::AllreduceOptions options(handle(h)->context);
    options.setOutput(data, n);
    void (*sum)(void*, const void*, const void*, size_t) = &gloo::sum<float>;
    options.setReduceFunction(sum);
    gloo::allreduce(options);
  });
}

int gfn_gloo_broadcast_f32(void* h, float* data, size_t n, int root) {
  return guarded([&] {
    gloo::BroadcastOptions options(handle(h)->context);
    options.setOutput(data, n);
    options.setRoot(root);
    gloo::broadcast(options);
  });
}

int gfn_gloo_barrier(void* h) {
  return guarded([&] {
    gloo::BarrierOptions options(handle(h)->context);
    gloo::barrier(options);
  });
}

// `out` (n × size values) is written on `root` only.
int gfn_gloo_gather_f64(void* h, const double* values, size_t n, double* out, int root) {
  return guarded([&] {
    gloo::GatherOptions options(handle(h)->context);
    options.setInput(const_cast<double*>(values), n);
    if (handle(h)->context->rank == root) {
      options.setOutput(out, n * handle(h)->context->size);
    }
    options.setRoot(root);
    gloo::gather(options);
  });
}

void gfn_gloo_destroy(void* h) { delete handle(h); }

}  // extern "C"
