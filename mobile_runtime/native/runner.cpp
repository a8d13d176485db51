// ptq4ris_runner: run an ExecuTorch program on raw input files, time it, write its outputs.
//
//   ptq4ris_runner --model M.pte --input a.bin [--input b.bin ...] [--output-dir DIR]
//                  [--warmup N] [--runs M] [--threads T] [--etdump FILE] [--no-timing]
//
// Each input file holds the raw little-endian bytes of one input tensor, with exactly the shape and dtype the
// program declares (the runner checks the size). Outputs go to DIR/output<i>.bin the same way. The last line on
// stdout is one JSON object: latency (ms) of the timed runs and the outputs' shapes and dtypes.
#include <executorch/devtools/etdump/etdump_flatcc.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

// The wheel ships the thread pool library but not its header: these are the two exported entry points we use.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;

namespace {

[[noreturn]] void fail(const std::string& message, int code = 2) {
  std::fprintf(stderr, "ptq4ris_runner: error: %s\n", message.c_str());
  std::exit(code);
}

struct Args {
  std::string model, output_dir, etdump;
  std::vector<std::string> inputs;
  int warmup = 3, runs = 10, threads = 0;
  bool timing = true;
};

Args parse(int argc, char** argv) {
  Args a;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) fail(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto number = [&](int& i) -> int {
    std::string v = value(i);
    char* end = nullptr;
    long n = std::strtol(v.c_str(), &end, 10);
    if (*end != '\0' || n < 0) fail(std::string(argv[i - 1]) + " takes a non-negative integer, got " + v);
    return static_cast<int>(n);
  };
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--model") a.model = value(i);
    else if (flag == "--input") a.inputs.push_back(value(i));
    else if (flag == "--output-dir") a.output_dir = value(i);
    else if (flag == "--warmup") a.warmup = number(i);
    else if (flag == "--runs") a.runs = number(i);
    else if (flag == "--threads") a.threads = number(i);
    else if (flag == "--etdump") a.etdump = value(i);
    // Under an instruction counter: no clock reads, and no latency digits whose printing costs vary run to run.
    else if (flag == "--no-timing") a.timing = false;
    else if (flag == "--help" || flag == "-h") {
      std::printf(
          "usage: ptq4ris_runner --model M.pte --input a.bin [--input b.bin ...] [--output-dir DIR]\n"
          "                      [--warmup N] [--runs M] [--threads T] [--etdump FILE] [--no-timing]\n");
      std::exit(0);
    } else fail("unknown argument " + flag + " (see --help)");
  }
  if (a.model.empty()) fail("--model is required");
  if (a.runs < 1) fail("--runs must be at least 1");
  return a;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read input file " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Char: return "int8";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Half: return "float16";
    default: return "other";
  }
}

template <typename Sizes>
std::string shape_json(const Sizes& sizes) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? "," : "") << sizes[i];
  s << "]";
  return s.str();
}

}  // namespace

int main(int argc, char** argv) {
  Args args = parse(argc, argv);
  if (args.threads > 0) {
    auto* pool = executorch::extension::threadpool::get_threadpool();
    if (pool == nullptr || !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(args.threads)))
      fail("could not set the thread pool to " + std::to_string(args.threads) + " threads");
  }
  std::unique_ptr<executorch::etdump::ETDumpGen> tracer;
  if (!args.etdump.empty()) tracer = std::make_unique<executorch::etdump::ETDumpGen>();
  Module module(args.model, Module::LoadMode::File, std::move(tracer));
  if (module.load() != Error::Ok) fail("cannot load program " + args.model + " (missing, corrupt, or not a .pte)");
  auto meta = module.method_meta("forward");
  if (!meta.ok()) fail(args.model + " has no forward method");
  if (args.inputs.size() != meta->num_inputs())
    fail(args.model + " takes " + std::to_string(meta->num_inputs()) + " inputs, got " +
         std::to_string(args.inputs.size()));

  std::vector<std::vector<char>> buffers;
  std::vector<executorch::extension::TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (size_t i = 0; i < args.inputs.size(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) fail("input " + std::to_string(i) + " is not a tensor");
    buffers.push_back(read_file(args.inputs[i]));
    if (buffers.back().size() != info->nbytes())
      fail("input " + std::to_string(i) + " (" + args.inputs[i] + ") has " + std::to_string(buffers.back().size()) +
           " bytes; the program expects " + std::to_string(info->nbytes()) + " (" + dtype_name(info->scalar_type()) +
           " " + shape_json(info->sizes()) + ")");
    std::vector<executorch::aten::SizesType> sizes(info->sizes().begin(), info->sizes().end());
    tensors.push_back(executorch::extension::from_blob(buffers.back().data(), sizes, info->scalar_type()));
    inputs.emplace_back(tensors.back());
  }

  std::vector<double> ms;
  std::vector<EValue> last;  // outputs of the last run: they live in the method's memory until the next one
  for (int r = 0; r < args.warmup + args.runs; ++r) {
    auto start = args.timing ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
    auto result = module.forward(inputs);
    auto stop = args.timing ? std::chrono::steady_clock::now() : start;
    if (!result.ok()) fail("forward failed with error code " + std::to_string(static_cast<int>(result.error())), 3);
    if (r >= args.warmup) ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    last = std::move(*result);
  }

  std::ostringstream outputs;
  for (size_t i = 0; i < last.size(); ++i) {
    const auto& tensor = last[i].toTensor();
    if (!args.output_dir.empty()) {
      std::string path = args.output_dir + "/output" + std::to_string(i) + ".bin";
      std::ofstream f(path, std::ios::binary);
      f.write(static_cast<const char*>(tensor.const_data_ptr()), tensor.nbytes());
      if (!f) fail("cannot write " + path);
    }
    outputs << (i ? "," : "") << "{\"dtype\":\"" << dtype_name(tensor.scalar_type()) << "\",\"shape\":"
            << shape_json(tensor.sizes()) << "}";
  }
  if (!args.etdump.empty()) {
    auto* gen = static_cast<executorch::etdump::ETDumpGen*>(module.event_tracer());
    auto dump = gen->get_etdump_data();
    std::ofstream f(args.etdump, std::ios::binary);
    f.write(static_cast<const char*>(dump.buf), dump.size);
    std::free(dump.buf);
    if (!f) fail("cannot write " + args.etdump);
  }

  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  size_t n = sorted.size();
  double median = n % 2 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  double mean = std::accumulate(ms.begin(), ms.end(), 0.0) / n;
  auto* pool = executorch::extension::threadpool::get_threadpool();
  char latency[160] = "null";
  if (args.timing)
    std::snprintf(latency, sizeof(latency), "{\"min\":%.4f,\"median\":%.4f,\"mean\":%.4f}", sorted.front(), median,
                  mean);
  std::printf("{\"model\":\"%s\",\"threads\":%zu,\"warmup\":%d,\"runs\":%zu,\"latency_ms\":%s,\"outputs\":[%s]}\n",
              args.model.c_str(), pool ? pool->get_thread_count() : 1, args.warmup, n, latency, outputs.str().c_str());
  return 0;
}
