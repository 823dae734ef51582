package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"time"
)

// watchFile reports on the returned channel each time the content of path
// changes, checking every interval until ctx ends. It compares content,
// not modification times, so an editor's rename dance or a ConfigMap's
// symlink swap counts, and a touch does not. Polling works on every file
// system and bind mount, where change notifications do not.
func watchFile(ctx context.Context, path string, interval time.Duration) <-chan struct{} {
	changed := make(chan struct{}, 1)
	sum := func() []byte {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		s := sha256.Sum256(data)
		return s[:]
	}
	last := sum()
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				if now := sum(); now != nil && !bytes.Equal(now, last) {
					last = now
					select {
					case changed <- struct{}{}:
					default:
					}
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return changed
}
