package manager

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// memTotal is the machine's memory as /proc/meminfo says (MemTotal), for
// host_memory: auto; 0 where it cannot be read, which leaves sleepers no
// host memory at level 1.
func memTotal() uint64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	return parseMemTotal(bufio.NewScanner(f))
}

// parseMemTotal reads MemTotal, in kB, from meminfo's lines.
func parseMemTotal(sc *bufio.Scanner) uint64 {
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:")
		if !ok {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			return 0
		}
		return kb << 10
	}
	return 0
}
