// SPDX-License-Identifier: GPL-2.0
//
// NeuroVisor's host-side eBPF layer (loaded by src/security/ebpf.rs).
//
// Two programs share one set of maps, so userspace manages a VM's cgroup in
// one place:
//
//  - `file_open` (BPF LSM): processes whose cgroup v2 id is in
//    `confined_cgroups` get -EPERM when they open a protected inode: one listed
//    in `protected_inodes` itself, or one that lies at most MAX_TREE_DEPTH
//    directories below a directory listed with PROTECT_TREE (same filesystem).
//  - `count_syscalls` (tracepoint raw_syscalls/sys_enter, or its twin
//    `count_syscalls_raw` on the raw tracepoint when tracefs is not mounted):
//    counts every system call made by a process whose cgroup id has an entry
//    in `syscall_counts`.
//
// Files are identified by (superblock dev, inode), never by path: paths can be
// reached through hard links, bind mounts, /proc/<pid>/root, chroots and
// renames, an inode cannot. Userspace converts stat()'s st_dev to the kernel's
// dev_t encoding (major << 20 | minor) before filling the map.
//
// The license must be GPL-compatible: bpf_get_current_cgroup_id and LSM
// attachment are GPL-only.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define EPERM 1

// Value flags of `protected_inodes`.
#define PROTECT_SELF 1 // opening this inode is denied
#define PROTECT_TREE 2 // opening anything below this directory is denied

// How many parent directories are checked for PROTECT_TREE. The walk is
// bounded so the verifier accepts it and a deep path cannot cost unbounded
// time inside file_open; deeper entries are not covered (documented in
// ebpf.rs).
#define MAX_TREE_DEPTH 8

// Indexes of `stats`.
#define STAT_DENIALS 0
#define STAT_DRY_RUN_DENIALS 1
#define STAT_MAX 2

struct file_key {
	__u64 ino;
	__u64 dev; // kernel encoding: MAJOR << 20 | MINOR
};

// cgroup v2 id -> 1. Processes in these cgroups are subject to the policy.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} confined_cgroups SEC(".maps");

// (dev, ino) -> PROTECT_* flags.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct file_key);
	__type(value, __u8);
} protected_inodes SEC(".maps");

// cgroup v2 id -> number of syscalls entered. Userspace creates the entry
// (zeroed) when it starts tracking a cgroup; the program never inserts, so
// untracked cgroups cost one failed lookup and the map cannot be filled by
// arbitrary processes. Per-CPU so the hot path needs no atomic operation.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} syscall_counts SEC(".maps");

// Global counters (STAT_*), per CPU; userspace sums them.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline __u8 inode_flags(struct inode *inode)
{
	struct file_key key = {};
	__u8 *flags;

	if (!inode)
		return 0;
	key.ino = BPF_CORE_READ(inode, i_ino);
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	flags = bpf_map_lookup_elem(&protected_inodes, &key);
	return flags ? *flags : 0;
}

static __always_inline void count_stat(__u32 idx)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &idx);

	if (n)
		*n += 1;
}

// The policy decision, shared by the LSM hook and the dry run below: 0 to
// allow, -EPERM to deny.
static __always_inline int file_verdict(struct file *file)
{
	__u64 cgid;
	struct dentry *dentry, *parent;
	int i;

	// Hot path for every process on the host: one lookup, then out.
	cgid = bpf_get_current_cgroup_id();
	if (!bpf_map_lookup_elem(&confined_cgroups, &cgid))
		return 0;

	if (inode_flags(BPF_CORE_READ(file, f_inode)) & PROTECT_SELF)
		return -EPERM;

	// Walk up the dentry tree looking for a PROTECT_TREE ancestor. d_parent
	// of a filesystem's root dentry is the dentry itself, so the walk stops
	// at the superblock's root and never crosses mounts.
	dentry = BPF_CORE_READ(file, f_path.dentry);
	for (i = 0; i < MAX_TREE_DEPTH; i++) {
		parent = BPF_CORE_READ(dentry, d_parent);
		if (!parent || parent == dentry)
			break;
		if (inode_flags(BPF_CORE_READ(parent, d_inode)) & PROTECT_TREE)
			return -EPERM;
		dentry = parent;
	}
	return 0;
}

SEC("lsm/file_open")
int BPF_PROG(file_open, struct file *file, int ret)
{
	int verdict;

	// An earlier BPF LSM program already decided: keep its verdict.
	if (ret != 0)
		return ret;
	verdict = file_verdict(file);
	if (verdict)
		count_stat(STAT_DENIALS);
	return verdict;
}

// Diagnostic twin of `file_open`: runs the same decision on every fsync() of
// an ext4 file and only counts what it would deny. Some kernels refuse to
// load LSM (trampoline) programs at all; there, this still proves the maps,
// the CO-RE reads, the device encoding and the tree walk against the real
// kernel. Loaded only on request (EbpfGuard::attach_policy_dry_run).
SEC("tp_btf/ext4_sync_file_enter")
int BPF_PROG(policy_dry_run, struct file *file, int datasync)
{
	if (file_verdict(file))
		count_stat(STAT_DRY_RUN_DENIALS);
	return 0;
}

static __always_inline void count_syscall(void)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u64 *n = bpf_map_lookup_elem(&syscall_counts, &cgid);

	if (n)
		*n += 1;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int count_syscalls(void *ctx)
{
	count_syscall();
	return 0;
}

// The same counter on the raw tracepoint. Attaching a classic tracepoint
// needs tracefs mounted (its event id is read from there); hosts without it
// get this one, which attaches by name through the bpf() syscall alone.
SEC("raw_tracepoint/sys_enter")
int count_syscalls_raw(void *ctx)
{
	count_syscall();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
