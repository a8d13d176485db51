/* Counts guest instructions retired under qemu user mode: a TCG plugin written against qemu's documented plugin API
 * (docs/devel/tcg-plugins.rst, API version 1 as in qemu 7.2). Debian's qemu-user accepts -plugin but ships no plugins
 * and no qemu-plugin.h, so the handful of API entry points used are declared here.
 *
 *   qemu-aarch64 -plugin ./libptq4ris_insn_count.so,outfile=count.txt ./program
 *
 * Built by `python -m mobile_runtime.instruction_count build` (mobile_runtime/instruction_count.py).
 *
 * Each translated block adds its instruction count when it runs on the main guest thread. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS = 0 };

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                                  void (*cb)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb));
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb,
                                                 void (*cb)(unsigned int vcpu_index, void *userdata),
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, void (*cb)(qemu_plugin_id_t id, void *userdata),
                                           void *userdata);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

static uint64_t retired;
static char outfile[4096];

static void on_exec(unsigned int vcpu_index, void *userdata) {
  /* Only the first guest thread (the program's main thread) is counted: at one thread the forward runs there, and
   * how far a thread-pool worker gets while it starts or exits depends on the host's scheduling. */
  if (vcpu_index != 0) return;
  __atomic_fetch_add(&retired, (uint64_t)(uintptr_t)userdata, __ATOMIC_RELAXED);
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS,
                                       (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

static void on_exit(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  FILE *f = outfile[0] ? fopen(outfile, "w") : stderr;
  if (f == NULL) return;
  fprintf(f, "instructions %llu\n", (unsigned long long)__atomic_load_n(&retired, __ATOMIC_RELAXED));
  if (f != stderr) fclose(f);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; i++) {
    if (strncmp(argv[i], "outfile=", 8) == 0) {
      if (strlen(argv[i] + 8) >= sizeof(outfile)) return -1;
      strcpy(outfile, argv[i] + 8);
    } else {
      return -1; /* an unknown argument: qemu reports the plugin failed to install */
    }
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, on_exit, NULL);
  return 0;
}
